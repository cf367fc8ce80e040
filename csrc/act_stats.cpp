// manu_fast._C: the fused MLP activation + neuron mask + segmented per-neuron statistics op on CPU.
//
// Why raw buffers and not the torch C++ API: the extension takes data pointers, sizes and row strides
// as plain integers (manu_fast/backends/cpp.py validates the tensors and passes tensor.data_ptr()).
// Binding against libtorch would tie the binary to the exact torch version and ABI it was compiled
// with (the CI machine has torch 2.13, the GPU machines 2.11), make the build take minutes instead of
// seconds, and need torch's headers at build time. With raw buffers the build needs only a C++17
// compiler and pybind11, and one build works with any torch. The price is that this module trusts its
// caller: it must only be called through backends.cpp.act_stats_cpp, which checks every shape, dtype,
// device and stride first. What can only be checked while reading the data (group ids out of range)
// is checked here, before any output is written, and raises ValueError.
//
// Work split: a task is a tile of ~kTileTarget neurons over ALL tokens (rows of the row-major (T, N) input).
// Threads (OpenMP) split tiles, never tokens, and every neuron's sums are accumulated in token order,
// so the results are bit-identical whatever the thread count. Per tile, each token row is converted
// to float, activated, written out in the input dtype and added into per-(site, group) double sums
// (shifted by the group's first value, so the variance stays accurate when |mean| >> std); at the end
// of the tile the call's partial (count, mean, M2, ...) is merged into the float64 accumulators with
// Chan's formula, in the same arithmetic as manu_fast.stats.merge_partials.
#include <pybind11/pybind11.h>

#ifdef _OPENMP
#include <omp.h>
#else  // built without OpenMP: one thread
static inline int omp_get_thread_num() { return 0; }
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace manu_fast {

// Codes shared with Python (manu_fast.activations.ACT_CODES and backends/cpp.py's dtype codes).
enum Activation { kSilu = 0, kGelu = 1, kGeluTanh = 2, kQuickGelu = 3, kRelu = 4, kIdentity = 5 };
enum DType { kF32 = 0, kBF16 = 1, kF16 = 2 };
// Statistic sites, and the rows of an accumulator (the order of manu_fast.schema.FIELDS).
enum Site { kSiteH = 0, kSitePre = 1, kSiteUp = 2, kNumSites = 3 };
enum Field { kCount = 0, kMean = 1, kM2 = 2, kSumAbs = 3, kSumSq = 4, kActive = 5, kNonfinite = 6 };

// Tiling (measured on a 2-core AMD EPYC, 4096 x 11008 bf16/fp32; see the note in the report): a task is a
// tile of ~kTileTarget neurons over all tokens, so its float64 sums (G x 5 x tile) stay in L2; inside a
// tile, blocks of kBlockRows rows are walked chunk by chunk (kChunk neurons, L1-sized buffers) along the
// row, so each row is read as a few sequential 2-4 KiB streams that the hardware prefetchers follow.
constexpr std::int64_t kTileTarget = 1024;
constexpr int kBlockRows = 32;
constexpr int kChunk = 256;
constexpr int kAlign = 16;  // tiles start at multiples of 16 neurons (64-byte lines)
constexpr int kNumSums = 5;  // s1, s2 (shifted), sum_sq, sum_abs, active

// The vectorised loops need their helpers inlined; GCC's heuristics otherwise leave exp as a call.
#if defined(__GNUC__)
#define MANU_FAST_INLINE static inline __attribute__((always_inline))
#else
#define MANU_FAST_INLINE static inline
#endif

static inline std::uint32_t float_bits(float f) {
    std::uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}

static inline float bits_float(std::uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

static inline float bf16_to_float(std::uint16_t b) { return bits_float(static_cast<std::uint32_t>(b) << 16); }

// Round to nearest even, NaN -> 0x7FC0: the same bits as torch's c10::BFloat16(float).
static inline std::uint16_t float_to_bf16(float f) {
    std::uint32_t u = float_bits(f);
    std::uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return f != f ? std::uint16_t(0x7FC0) : static_cast<std::uint16_t>(rounded);
}

// IEEE half -> float, exact (normals, subnormals, Inf, NaN payloads), branch-free.
static inline float f16_to_float(std::uint16_t h) {
    std::uint32_t em = static_cast<std::uint32_t>(h & 0x7FFFu) << 13;
    std::uint32_t exp = em & 0x0F800000u;
    std::uint32_t normal = em + ((127u - 15u) << 23);
    std::uint32_t infnan = normal + ((128u - 16u) << 23);
    float subnormal = bits_float(em + (113u << 23)) - bits_float(113u << 23);
    std::uint32_t mag = exp == 0x0F800000u ? infnan : (exp == 0 ? float_bits(subnormal) : normal);
    return bits_float(mag | (static_cast<std::uint32_t>(h & 0x8000u) << 16));
}

// float -> IEEE half, round to nearest even, overflow -> Inf, NaN -> 0x7E00 (sign kept), like torch.
static inline std::uint16_t float_to_f16(float f) {
    std::uint32_t u = float_bits(f);
    std::uint32_t sign = u & 0x80000000u;
    u ^= sign;
    std::uint32_t special = u > (255u << 23) ? 0x7E00u : 0x7C00u;
    const std::uint32_t denorm_magic_bits = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    std::uint32_t subnormal = float_bits(bits_float(u) + bits_float(denorm_magic_bits)) - denorm_magic_bits;
    std::uint32_t normal = (u + ((15u - 127u) << 23) + 0xFFFu + ((u >> 13) & 1u)) >> 13;
    std::uint32_t mag = u >= ((127u + 16u) << 23) ? special : (u < (113u << 23) ? subnormal : normal);
    return static_cast<std::uint16_t>(mag | (sign >> 16));
}

// One call's arguments, already validated by the Python wrapper.
struct Problem {
    const char* pre;
    const char* up;  // null for a plain MLP
    std::int64_t pre_row_stride, up_row_stride;  // in bytes
    std::int64_t T, N;
    int elem_size;
    const std::uint8_t* keep;  // (N,) bool or null
    const std::int32_t* gid;   // (T,) or null: every token in group 0
    int G;
    double tau;
    double* acc[kNumSites];  // (NUM_FIELDS, G, N) float64 or null, indexed by Site
    char* out;               // (T, N) contiguous, input dtype, or null
    std::vector<double> group_count;      // tokens per group in this call
    std::vector<std::int64_t> first_row;  // first token of each group (-1: none)

    const char* pre_row(std::int64_t t) const { return pre + t * pre_row_stride; }
    const char* up_row(std::int64_t t) const { return up + t * up_row_stride; }
};

struct TileSums {
    double *s1, *s2, *sum_sq, *sum_abs, *active;
};

// One thread's buffers: converted rows of one chunk, and the (site, group) sums and shifts of one tile.
struct TileScratch {
    std::vector<float> pre_buf, up_buf, h_buf;
    std::vector<double> sum_buf[kNumSites], shift_buf[kNumSites];
    std::int64_t len;
    int G;

    TileScratch(const Problem& p, std::int64_t range_len)
        : pre_buf(kChunk), up_buf(kChunk), h_buf(kChunk), len(range_len), G(p.G) {
        for (int site = 0; site < kNumSites; ++site) {
            if (!p.acc[site]) continue;
            sum_buf[site].assign(static_cast<std::size_t>(G) * kNumSums * len, 0.0);
            shift_buf[site].assign(static_cast<std::size_t>(G) * len, 0.0);
        }
    }
    void reset() {
        for (int site = 0; site < kNumSites; ++site) std::fill(sum_buf[site].begin(), sum_buf[site].end(), 0.0);
    }
    TileSums sums(int site, int g, std::int64_t offset) {
        double* base = sum_buf[site].data() + static_cast<std::size_t>(g) * kNumSums * len + offset;
        return {base, base + len, base + 2 * len, base + 3 * len, base + 4 * len};
    }
    double* shift(int site, int g) { return shift_buf[site].data() + static_cast<std::size_t>(g) * len; }
};

// acc <- Chan merge of acc and this call's partial for one (site, group, neuron); sums = {s1, s2 (shifted
// by `shift`), sum_sq, sum_abs, active, nonfinite}. Same arithmetic as stats.merge_partials.
static inline void merge_column(const Problem& p, int site, int g, std::int64_t j, double shift, const double* sums) {
    double* acc = p.acc[site];
    const std::int64_t field = static_cast<std::int64_t>(p.G) * p.N;
    const std::int64_t at = static_cast<std::int64_t>(g) * p.N + j;
    const double n_b = p.group_count[g] - sums[5];
    const double mean_b = n_b > 0 ? shift + sums[0] / n_b : 0.0;
    const double m2_b = n_b > 0 ? std::max(sums[1] - sums[0] * sums[0] / n_b, 0.0) : 0.0;
    const double n_a = acc[kCount * field + at], mean_a = acc[kMean * field + at], m2_a = acc[kM2 * field + at];
    const double n = n_a + n_b;
    const double mean = n > 0 ? (n_a * mean_a + n_b * mean_b) / n : 0.0;
    const double d_a = mean_a - mean, d_b = mean_b - mean;
    acc[kCount * field + at] = n;
    acc[kMean * field + at] = mean;
    acc[kM2 * field + at] = (m2_a + m2_b) + (n_a * d_a * d_a + n_b * d_b * d_b);
    acc[kSumAbs * field + at] += sums[3];
    acc[kSumSq * field + at] += sums[2];
    acc[kActive * field + at] += sums[4];
    acc[kNonfinite * field + at] += sums[5];
}

namespace generic {
#include "act_stats_kernel.h"
}  // namespace generic

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MANU_FAST_HAVE_AVX2_VARIANT 1
#pragma GCC push_options
#pragma GCC target("avx2")
namespace avx2 {
#include "act_stats_kernel.h"
}  // namespace avx2
#pragma GCC pop_options
#endif

using TileFn = void (*)(const Problem&, std::int64_t, std::int64_t, TileScratch&);

template <int DT>
static TileFn pick_for_dtype(int act, bool use_avx2) {
#ifdef MANU_FAST_HAVE_AVX2_VARIANT
    if (use_avx2) {
        switch (act) {
            case kSilu: return avx2::process_tile<DT, kSilu>;
            case kGelu: return avx2::process_tile<DT, kGelu>;
            case kGeluTanh: return avx2::process_tile<DT, kGeluTanh>;
            case kQuickGelu: return avx2::process_tile<DT, kQuickGelu>;
            case kRelu: return avx2::process_tile<DT, kRelu>;
            case kIdentity: return avx2::process_tile<DT, kIdentity>;
        }
    }
#endif
    (void)use_avx2;
    switch (act) {
        case kSilu: return generic::process_tile<DT, kSilu>;
        case kGelu: return generic::process_tile<DT, kGelu>;
        case kGeluTanh: return generic::process_tile<DT, kGeluTanh>;
        case kQuickGelu: return generic::process_tile<DT, kQuickGelu>;
        case kRelu: return generic::process_tile<DT, kRelu>;
        case kIdentity: return generic::process_tile<DT, kIdentity>;
    }
    throw std::invalid_argument("unknown activation code " + std::to_string(act));
}

static bool cpu_has_avx2() {
#ifdef MANU_FAST_HAVE_AVX2_VARIANT
    return __builtin_cpu_supports("avx2");
#else
    return false;
#endif
}

static TileFn pick_tile_fn(int dtype, int act, bool use_avx2) {
    switch (dtype) {
        case kF32: return pick_for_dtype<kF32>(act, use_avx2);
        case kBF16: return pick_for_dtype<kBF16>(act, use_avx2);
        case kF16: return pick_for_dtype<kF16>(act, use_avx2);
    }
    throw std::invalid_argument("unknown dtype code " + std::to_string(dtype));
}

static double* as_f64(std::uintptr_t p) { return reinterpret_cast<double*>(p); }

void act_stats(std::uintptr_t pre, std::int64_t pre_row_stride, std::uintptr_t up, std::int64_t up_row_stride,
               std::int64_t T, std::int64_t N, int dtype, int act, std::uintptr_t keep, std::uintptr_t gid, int G,
               double tau, std::uintptr_t hidden_acc, std::uintptr_t pre_acc, std::uintptr_t up_acc,
               std::uintptr_t out, int num_threads, bool allow_avx2) {
    if (T < 0 || N < 0 || G < 1 || num_threads < 1) throw std::invalid_argument("act_stats: bad sizes");
    Problem p;
    p.pre = reinterpret_cast<const char*>(pre);
    p.up = reinterpret_cast<const char*>(up);
    p.elem_size = dtype == kF32 ? 4 : 2;
    p.pre_row_stride = pre_row_stride * p.elem_size;
    p.up_row_stride = up_row_stride * p.elem_size;
    p.T = T;
    p.N = N;
    p.keep = reinterpret_cast<const std::uint8_t*>(keep);
    p.gid = reinterpret_cast<const std::int32_t*>(gid);
    p.G = G;
    p.tau = tau;
    p.acc[kSiteH] = as_f64(hidden_acc);
    p.acc[kSitePre] = as_f64(pre_acc);
    p.acc[kSiteUp] = as_f64(up_acc);
    p.out = reinterpret_cast<char*>(out);
    const TileFn tile_fn = pick_tile_fn(dtype, act, allow_avx2 && cpu_has_avx2());

    p.group_count.assign(G, 0.0);
    p.first_row.assign(G, -1);
    for (std::int64_t t = 0; t < T; ++t) {
        const std::int32_t g = p.gid ? p.gid[t] : 0;
        if (g < -1 || g >= G) {
            throw std::invalid_argument("group id " + std::to_string(g) + " at token " + std::to_string(t) +
                                        " is out of range [-1, " + std::to_string(G - 1) + "]");
        }
        if (g < 0) continue;
        if (p.first_row[g] < 0) p.first_row[g] = t;
        p.group_count[g] += 1;
    }
    if (N == 0) return;

    // Threads split neurons into tiles of about kTileTarget (as many per thread). Every neuron's sums run
    // over the tokens in order in the same arithmetic whatever tile it falls in, so the bits do not depend
    // on the thread count or the tiling.
    const std::int64_t tiles_per_thread = std::max<std::int64_t>(1, (N / num_threads + kTileTarget / 2) / kTileTarget);
    const std::int64_t num_tiles_wanted = tiles_per_thread * num_threads;
    const std::int64_t tile = ((N + num_tiles_wanted - 1) / num_tiles_wanted + kAlign - 1) / kAlign * kAlign;
    const std::int64_t num_tiles = (N + tile - 1) / tile;
    const int threads = static_cast<int>(std::min<std::int64_t>(num_threads, num_tiles));
    // Scratch is allocated here, where std::bad_alloc still becomes a Python MemoryError.
    std::vector<TileScratch> scratch(threads, TileScratch(p, tile));
    py::gil_scoped_release no_gil;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (std::int64_t i = 0; i < num_tiles; ++i) {
        TileScratch& mine = scratch[omp_get_thread_num()];
        const std::int64_t a = i * tile;
        mine.reset();
        tile_fn(p, a, std::min<std::int64_t>(N, a + tile), mine);
    }
}

}  // namespace manu_fast

PYBIND11_MODULE(_C, m) {
    m.doc() = "manu_fast C++ CPU kernels on raw buffers; call them through manu_fast.backends.cpp, which validates inputs.";
    m.def("act_stats", &manu_fast::act_stats, py::arg("pre"), py::arg("pre_row_stride"), py::arg("up"),
          py::arg("up_row_stride"), py::arg("T"), py::arg("N"), py::arg("dtype"), py::arg("act"), py::arg("keep"),
          py::arg("gid"), py::arg("num_groups"), py::arg("tau"), py::arg("hidden_acc"), py::arg("pre_acc"),
          py::arg("up_acc"), py::arg("out"), py::arg("num_threads"), py::arg("allow_avx2") = true,
          "Fused activation + keep mask + segmented statistics over a (T, N) row-major buffer (pointers as ints).");
        m.attr("HAVE_AVX2_VARIANT") = manu_fast::cpu_has_avx2();
}
