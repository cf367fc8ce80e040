// The per-tile kernel of act_stats. This header is included twice by act_stats.cpp, inside two
// namespaces: once for the baseline ISA and once under `#pragma GCC target("avx2")`, so a portable
// build still uses 256-bit vectors where the CPU has them (picked at run time). It therefore has no
// include guard and includes nothing itself.
//
// Only IEEE +, -, *, /, comparisons and bit operations are used in the vectorised loops, and the build
// is ISO C++ (-std=c++17, so no FMA contraction): the scalar epilogue, the vector body and both ISA
// variants compute the same bits for the same element.

// exp(x) for the sigmoid: 2^n * exp(r), r = x - n ln2 (Cody-Waite, |r| <= ln2/2), degree-7 Taylor
// polynomial (truncation 5e-9 relative, below half an ulp), so ~1 ulp overall. x > 88 gives +inf
// (the sigmoid is then < 1e-38 and is flushed to 0), x < -87.3 gives 0; NaN stays NaN.
MANU_FAST_INLINE float exp_for_sigmoid(float x) {
    const float hi = 88.0f, lo = -87.33654f;
    float xc = x < lo ? lo : x;
    xc = xc > hi ? hi : xc;
    const float round_magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low bits
    float t = xc * 1.44269504088896341f + round_magic;
    float n = t - round_magic;
    std::uint32_t n_bits = float_bits(t) - float_bits(round_magic);  // n as two's complement, no UB for NaN
    float r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    float scale = bits_float((n_bits + 127u) << 23);
    float e = p * scale;
    e = x > hi ? std::numeric_limits<float>::infinity() : e;
    return x < lo ? 0.0f : e;
}

template <int ACT>
MANU_FAST_INLINE float activation(float x) {
    if constexpr (ACT == kSilu) {
        return x / (1.0f + exp_for_sigmoid(-x));
    } else if constexpr (ACT == kGelu) {
        // x * Phi(x) via erfc: no cancellation for negative x (unlike 1 + erf), in double, rounded once.
        return static_cast<float>(0.5 * x * std::erfc(-0.7071067811865476 * x));
    } else if constexpr (ACT == kGeluTanh) {
        // 0.5 x (1 + tanh(y)) == x * sigmoid(2y): the same fast path as silu, no cancellation near y = 0.
        float y = 0.7978845608028654f * (x + 0.044715f * x * x * x);
        return x / (1.0f + exp_for_sigmoid(-2.0f * y));
    } else if constexpr (ACT == kQuickGelu) {
        return x / (1.0f + exp_for_sigmoid(-1.702f * x));
    } else if constexpr (ACT == kRelu) {
        return x < 0.0f ? 0.0f : x;  // NaN stays NaN, like torch
    } else {
        return x;
    }
}

template <int DT>
static inline void load_row(const void* src, float* dst, int w) {
    if constexpr (DT == kF32) {
        const float* s = static_cast<const float*>(src);
        for (int j = 0; j < w; ++j) dst[j] = s[j];
    } else if constexpr (DT == kBF16) {
        const std::uint16_t* s = static_cast<const std::uint16_t*>(src);
        for (int j = 0; j < w; ++j) dst[j] = bf16_to_float(s[j]);
    } else {
        const std::uint16_t* s = static_cast<const std::uint16_t*>(src);
        for (int j = 0; j < w; ++j) dst[j] = f16_to_float(s[j]);
    }
}

template <int DT>
static inline void store_row(const float* src, void* dst, int w) {
    if constexpr (DT == kF32) {
        float* d = static_cast<float*>(dst);
        for (int j = 0; j < w; ++j) d[j] = src[j];
    } else if constexpr (DT == kBF16) {
        std::uint16_t* d = static_cast<std::uint16_t*>(dst);
        for (int j = 0; j < w; ++j) d[j] = float_to_bf16(src[j]);
    } else {
        std::uint16_t* d = static_cast<std::uint16_t*>(dst);
        for (int j = 0; j < w; ++j) d[j] = float_to_f16(src[j]);
    }
}

// h[j] = act(pre[j]) (* up[j]), zeroed where keep[j] is false. keep/up may be null.
template <int ACT>
static inline void compute_h(const float* pre, const float* up, const std::uint8_t* keep, float* h, int w) {
    if (up) {
        for (int j = 0; j < w; ++j) h[j] = activation<ACT>(pre[j]) * up[j];
    } else {
        for (int j = 0; j < w; ++j) h[j] = activation<ACT>(pre[j]);
    }
    if (keep) {
        for (int j = 0; j < w; ++j) h[j] = keep[j] ? h[j] : 0.0f;
    }
}

// One token row of one group into the tile's double sums. Non-finite values are NOT filtered here
// (that would cost a test per element): they turn sum_sq into Inf/NaN, and process_tile recomputes
// exactly those (group, neuron) columns with filtering.
MANU_FAST_INLINE void accumulate_row(const float* x, const double* shift, TileSums s, double tau, int w) {
    // The five sums are disjoint rows of the scratch: no aliasing (GCC cannot prove it and gives up).
#pragma omp simd
    for (int j = 0; j < w; ++j) {
        double v = x[j];
        double d = v - shift[j];
        double a = std::fabs(v);
        s.s1[j] += d;
        s.s2[j] += d * d;
        s.sum_sq[j] += v * v;
        s.sum_abs[j] += a;
        s.active[j] += a > tau ? 1.0 : 0.0;
    }
}

// Values of `site` for one row of the tile (neurons [j0, j0 + w)) into buf; returns buf.
template <int DT, int ACT>
static inline const float* site_values(const Problem& p, int site, std::int64_t t, std::int64_t j0, int w,
                                       float* pre_buf, float* up_buf, float* h_buf) {
    load_row<DT>(p.pre_row(t) + j0 * p.elem_size, pre_buf, w);
    if (site == kSitePre) return pre_buf;
    if (p.up) load_row<DT>(p.up_row(t) + j0 * p.elem_size, up_buf, w);
    if (site == kSiteUp) return up_buf;
    compute_h<ACT>(pre_buf, p.up ? up_buf : nullptr, p.keep ? p.keep + j0 : nullptr, h_buf, w);
    return h_buf;
}

// The slow path for one (site, group, neuron) column that saw a non-finite value: recompute its sums
// over the finite values only, with the same per-element arithmetic (and order) as accumulate_row.
template <int DT, int ACT>
static void recompute_column(const Problem& p, int site, int g, std::int64_t j, double shift, double* sums) {
    double s1 = 0, s2 = 0, sum_sq = 0, sum_abs = 0, active = 0, nonfinite = 0;
    float pre_v = 0.0f, up_v = 0.0f, h_v = 0.0f;  // up_v is only read when p.up is set; initialised for -Wmaybe-uninitialized
    for (std::int64_t t = 0; t < p.T; ++t) {
        if ((p.gid ? p.gid[t] : 0) != g) continue;
        float x = *site_values<DT, ACT>(p, site, t, j, 1, &pre_v, &up_v, &h_v);
        if (!std::isfinite(x)) {
            nonfinite += 1;
            continue;
        }
        double v = x;
        double d = v - shift;
        double a = std::fabs(v);
        s1 += d;
        s2 += d * d;
        sum_sq += v * v;
        sum_abs += a;
        active += a > p.tau ? 1.0 : 0.0;
    }
    sums[0] = s1; sums[1] = s2; sums[2] = sum_sq; sums[3] = sum_abs; sums[4] = active; sums[5] = nonfinite;
}

// One tile, neurons [a, b), over all tokens: write h, gather the sums of every requested site, merge them
// into the accumulators. Rows are walked in blocks of kBlockRows and, within a block, chunk by chunk along
// the row (see the tiling note in act_stats.cpp).
template <int DT, int ACT>
static void process_tile(const Problem& p, std::int64_t a, std::int64_t b, TileScratch& scratch) {
    const bool need_h = p.out || p.acc[kSiteH];
    float* pre_buf = scratch.pre_buf.data();
    float* up_buf = scratch.up_buf.data();
    float* h_buf = scratch.h_buf.data();
    const float* site_buf[kNumSites] = {h_buf, pre_buf, up_buf};
    for (std::int64_t t0 = 0; t0 < p.T; t0 += kBlockRows) {
        const std::int64_t t1 = std::min<std::int64_t>(t0 + kBlockRows, p.T);
        for (std::int64_t j0 = a; j0 < b; j0 += kChunk) {
            const int w = static_cast<int>(std::min<std::int64_t>(kChunk, b - j0));
            const std::int64_t offset = j0 - a;  // into the range's sums
            const std::uint8_t* keep = p.keep ? p.keep + j0 : nullptr;
            for (std::int64_t t = t0; t < t1; ++t) {
                load_row<DT>(p.pre_row(t) + j0 * p.elem_size, pre_buf, w);
                if (p.up) load_row<DT>(p.up_row(t) + j0 * p.elem_size, up_buf, w);
                if (need_h) compute_h<ACT>(pre_buf, p.up ? up_buf : nullptr, keep, h_buf, w);
                if (p.out) store_row<DT>(h_buf, p.out + (t * p.N + j0) * p.elem_size, w);
                const int g = p.gid ? p.gid[t] : 0;
                if (g < 0) continue;
                for (int site = 0; site < kNumSites; ++site) {
                    if (!p.acc[site]) continue;
                    double* shift = scratch.shift(site, g) + offset;
                    if (t == p.first_row[g]) {  // shift = the group's first value: accurate when |mean| >> std
                        for (int j = 0; j < w; ++j) shift[j] = std::isfinite(site_buf[site][j]) ? site_buf[site][j] : 0.0;
                    }
                    accumulate_row(site_buf[site], shift, scratch.sums(site, g, offset), p.tau, w);
                }
            }
        }
    }
    for (int site = 0; site < kNumSites; ++site) {
        if (!p.acc[site]) continue;
        for (int g = 0; g < p.G; ++g) {
            TileSums s = scratch.sums(site, g, 0);
            const double* shift = scratch.shift(site, g);
            for (std::int64_t j = 0; j < b - a; ++j) {
                double sums[6] = {s.s1[j], s.s2[j], s.sum_sq[j], s.sum_abs[j], s.active[j], 0.0};
                if (!std::isfinite(sums[2])) recompute_column<DT, ACT>(p, site, g, a + j, shift[j], sums);
                merge_column(p, site, g, a + j, shift[j], sums);
            }
        }
    }
}
