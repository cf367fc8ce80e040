"""Pieces shared by the Triton kernels: activations, the run-based statistics epilogue, launch planning, the
reused scratch and the on-device float64 merge (kernels/README.md explains the scheme).

Statistics scheme (both kernels). The grid is (neuron blocks, token chunks); a program walks its chunk one token
tile at a time. Tokens of one group come in runs (a batch is image tokens, then text, then padding), so a
program keeps the statistics of the *current run* in registers — sums of shifted values ``x - c``, of their
squares and of |x|, and the active and non-finite counts — elementwise, one accumulator per tile position, so a
tile of one group costs no reduction at all. Only when the group changes (or the chunk ends) are the
accumulators reduced and added to the program's partial for that group, a (PARTIAL_FIELDS, N) fp32 slice of a
scratch buffer: (count, shift c, sum(x - c), sum((x - c)^2), sum|x|, active, nonfinite). The shift c of a group
is fixed per program: the mean of the group's finite values in the first tile where the program meets the
group, which lies within a few standard deviations of the group's mean, so sum((x - c)^2) - sum(x - c)^2 / n
loses no precision to a large |mean|/std. A 64-bit mask per program records which groups it wrote; untouched
partials are never read, so the scratch needs no zeroing and is reused across calls. ``merge_kernel`` then
folds the partials, in chunk order, into the float64 accumulators with Chan's formula, on the device: two
kernel launches per call, no host sync, no allocation besides the output.

Deterministic: every partial belongs to one program, every reduction has a fixed order, no atomics.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import triton
import triton.language as tl

from manu_fast.activations import ACT_CODES, check_activation
from manu_fast.schema import FIELD_INDEX

# fp32 counts are exact below 2**24; a chunk never holds more tokens than this.
MAX_CHUNK_TOKENS = 1 << 22
# Programs per SM the chunking aims for (enough to hide memory latency; more only grows the scratch).
PROGRAMS_PER_SM = 4
# Group ids live in a 64-bit mask per program.
MAX_GROUPS = 64
# Fields of a program's partial (per group and neuron), see the module docstring.
P_COUNT, P_SHIFT, P_S1, P_S2, P_SUM_ABS, P_ACTIVE, P_NONFINITE = (tl.constexpr(i) for i in range(7))
PARTIAL_FIELDS = 7

# Rows of a float64 accumulator (manu_fast.schema.FIELDS, the one order Python, C++ and this merge share).
A_COUNT, A_MEAN, A_M2, A_SUM_ABS, A_SUM_SQ, A_ACTIVE, A_NONFINITE = (
    tl.constexpr(FIELD_INDEX[f]) for f in ("count", "mean", "m2", "sum_abs", "sum_sq", "active", "nonfinite"))

ACT_SILU = tl.constexpr(ACT_CODES["silu"])
ACT_GELU = tl.constexpr(ACT_CODES["gelu"])
ACT_GELU_TANH = tl.constexpr(ACT_CODES["gelu_tanh"])
ACT_QUICK_GELU = tl.constexpr(ACT_CODES["quick_gelu"])
ACT_RELU = tl.constexpr(ACT_CODES["relu"])


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def apply_activation(x, ACT: tl.constexpr):
    """act(x) in fp32. gelu_tanh uses 0.5 * (1 + tanh(z)) == sigmoid(2z): no cancellation for x << 0."""
    if ACT == ACT_SILU:
        y = x * _sigmoid(x)
    elif ACT == ACT_GELU:
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == ACT_GELU_TANH:
        y = x * _sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))  # 2 * sqrt(2 / pi)
    elif ACT == ACT_QUICK_GELU:
        y = x * _sigmoid(1.702 * x)
    elif ACT == ACT_RELU:
        y = tl.where(x < 0.0, 0.0, x)  # keeps NaN, like torch.relu
    else:
        y = x
    return y


@triton.jit
def to_output_dtype(h, out_ptr, RTNE_BF16: tl.constexpr):
    """h (fp32) in the output's dtype, rounded to nearest even. RTNE_BF16 rounds bf16 by hand: Triton's CPU
    interpreter truncates fp32 -> bf16 (compiled code rounds correctly), and tests compare to PyTorch."""
    if RTNE_BF16:
        bits = h.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        out = tl.where(h == h, rounded, h.to(tl.bfloat16))  # NaN payloads must not round into Inf
    else:
        out = h.to(out_ptr.dtype.element_ty)
    return out


@triton.jit
def chunk_token_range(chunk, tiles_per_chunk, T, BLOCK_T: tl.constexpr):
    """[begin, end) of the tokens that token chunk ``chunk`` walks (``tiles_per_chunk`` tiles, see plan_chunks)."""
    t_begin = chunk * tiles_per_chunk * BLOCK_T
    return t_begin, tl.minimum(t_begin + tiles_per_chunk * BLOCK_T, T)


# ---- per-site run statistics ----
# A site's run state, one tuple (c, s1, s2, sa, na, nf) = shift (BLOCK_N,), then sums of x - c, (x - c)^2, |x| (fp32) and
# counts of |x| > tau and of non-finite x (int32), each (ACC_ROWS, BLOCK_N): ACC_ROWS == BLOCK_T keeps one
# accumulator per tile position (no reduction per tile), ACC_ROWS == 1 reduces each tile (fewer registers).

@triton.jit
def _empty_state(ACC_ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    z = tl.zeros([ACC_ROWS, BLOCK_N], dtype=tl.float32)
    zi = tl.zeros([ACC_ROWS, BLOCK_N], dtype=tl.int32)
    return tl.zeros([BLOCK_N], dtype=tl.float32), z, z, z, zi, zi


@triton.jit
def _fold(acc, x, ACC_ROWS: tl.constexpr):
    if ACC_ROWS == 1:
        acc += tl.sum(x, axis=0, keep_dims=True)
    else:
        acc += x
    return acc


@triton.jit
def _site_add(x, take, state, tau, ACC_ROWS: tl.constexpr):
    """Add the rows ``take`` (BLOCK_T, 1) of tile ``x`` (BLOCK_T, BLOCK_N) to a site's run state."""
    c, s1, s2, sa, na, nf = state
    fin = take & (tl.abs(x) < float("inf"))  # False for NaN and +-Inf
    x0 = tl.where(fin, x, 0.0)
    d = tl.where(fin, x - c[None, :], 0.0)
    s1 = _fold(s1, d, ACC_ROWS)
    s2 = _fold(s2, d * d, ACC_ROWS)
    sa = _fold(sa, tl.abs(x0), ACC_ROWS)
    na = _fold(na, (tl.abs(x0) > tau).to(tl.int32), ACC_ROWS)
    nf = _fold(nf, (take & ~(tl.abs(x) < float("inf"))).to(tl.int32), ACC_ROWS)
    return c, s1, s2, sa, na, nf


@triton.jit
def _group_bit(touched, k):
    return ((touched >> k.to(tl.int64)) & 1) != 0


@triton.jit
def _and_scalar(mask, flag):
    """mask & flag for a scalar flag (written as a where: the interpreter of triton 3.9 turns bool & scalar bool
    into an int32 array that tl.load refuses as a mask)."""
    return tl.where(flag, mask, False)


@triton.jit
def _site_shift(x, take, part_ptr, k, touched, field, N, cols, col_ok):
    """Group k's shift in this program: the one stored with its partial when the program wrote one before, else
    the mean of the finite values of k's rows in this tile (0 for a neuron with none)."""
    fin = take & (tl.abs(x) < float("inf"))
    n = tl.sum(fin.to(tl.float32), axis=0)
    tile_mean = tl.sum(tl.where(fin, x, 0.0), axis=0) / tl.maximum(n, 1.0)
    seen = _group_bit(touched, k)
    stored = tl.load(part_ptr + P_SHIFT * field + k * N + cols, mask=_and_scalar(col_ok, seen), other=0.0)
    return tl.where(seen, stored, tile_mean)


@triton.jit
def _site_flush(part_ptr, k, touched, rows, state, field, N, cols, col_ok):
    """Reduce a site's run state and add it to the program's partial of group k (written fresh when the program
    has none yet: nothing is read from an untouched, unzeroed partial)."""
    c, s1, s2, sa, na, nf = state
    nf_n = tl.sum(nf, axis=0).to(tl.float32)
    p = part_ptr + k * N + cols
    old = _and_scalar(col_ok, _group_bit(touched, k))
    tl.store(p + P_COUNT * field,
             tl.load(p + P_COUNT * field, mask=old, other=0.0) + (tl.sum(rows, axis=0).to(tl.float32) - nf_n),
             mask=col_ok)
    tl.store(p + P_SHIFT * field, c, mask=col_ok)
    tl.store(p + P_S1 * field, tl.load(p + P_S1 * field, mask=old, other=0.0) + tl.sum(s1, axis=0), mask=col_ok)
    tl.store(p + P_S2 * field, tl.load(p + P_S2 * field, mask=old, other=0.0) + tl.sum(s2, axis=0), mask=col_ok)
    tl.store(p + P_SUM_ABS * field, tl.load(p + P_SUM_ABS * field, mask=old, other=0.0) + tl.sum(sa, axis=0),
             mask=col_ok)
    tl.store(p + P_ACTIVE * field,
             tl.load(p + P_ACTIVE * field, mask=old, other=0.0) + tl.sum(na, axis=0).to(tl.float32), mask=col_ok)
    tl.store(p + P_NONFINITE * field, tl.load(p + P_NONFINITE * field, mask=old, other=0.0) + nf_n, mask=col_ok)


@triton.jit
def flush_run(run, sites, part_ptr, pre_site_offset, up_site_offset, field, N, cols, col_ok,
              STATS_H: tl.constexpr, STATS_PRE: tl.constexpr, STATS_UP: tl.constexpr):
    """Write the current run (``run`` = (group or -1, rows per tile position, touched groups)) of every gathered
    site (``sites`` = (hidden, pre, up) run states) into the partials; returns the updated mask of touched groups."""
    run_k, run_rows, touched = run
    h_state, pre_state, up_state = sites
    if run_k >= 0:
        if STATS_H:
            _site_flush(part_ptr, run_k, touched, run_rows, h_state, field, N, cols, col_ok)
        if STATS_PRE:
            _site_flush(part_ptr + pre_site_offset, run_k, touched, run_rows, pre_state, field, N, cols, col_ok)
        if STATS_UP:
            _site_flush(part_ptr + up_site_offset, run_k, touched, run_rows, up_state, field, N, cols, col_ok)
        touched = touched | (tl.full([], 1, tl.int64) << run_k.to(tl.int64))
    return touched


@triton.jit
def _add_sites(h, pre, up, take, sites, tau,
               STATS_H: tl.constexpr, STATS_PRE: tl.constexpr, STATS_UP: tl.constexpr, ACC_ROWS: tl.constexpr):
    h_state, pre_state, up_state = sites
    if STATS_H:
        h_state = _site_add(h, take, h_state, tau, ACC_ROWS)
    if STATS_PRE:
        pre_state = _site_add(pre, take, pre_state, tau, ACC_ROWS)
    if STATS_UP:
        up_state = _site_add(up, take, up_state, tau, ACC_ROWS)
    return h_state, pre_state, up_state


@triton.jit
def _new_run_state(x, take, part_ptr, k, touched, field, N, cols, col_ok, ACC_ROWS: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """A site's fresh run state for group k, shifted by ``_site_shift``."""
    c, s1, s2, sa, na, nf = _empty_state(ACC_ROWS, BLOCK_N)
    c = _site_shift(x, take, part_ptr, k, touched, field, N, cols, col_ok)
    return c, s1, s2, sa, na, nf


@triton.jit
def statistics_step(h, pre, up, gid, valid, run, sites, part_ptr, pre_site_offset, up_site_offset, num_groups, N,
                    cols, col_ok, tau, STATS_H: tl.constexpr, STATS_PRE: tl.constexpr, STATS_UP: tl.constexpr,
                    ACC_ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Add one tile (rows ``valid`` with group ids ``gid``) of h, pre and up to the run statistics; returns the
    updated ``(run, sites)``.

    ``run`` = (group of the current run or -1, ``run_rows``, touched groups mask): ``run_rows`` (BLOCK_T,) counts
    the run's rows per tile position (reduced only when the run is flushed). ``sites`` = the (hidden, pre, up) run
    states. A tile whose rows all belong to the current run (the usual case) costs one scalar reduction, the test;
    else the groups present in the tile are visited in increasing order, each new group flushing the current run
    and starting its own."""
    run_k, run_rows, touched = run
    if tl.max(tl.where(valid & (gid != run_k), 1, 0), axis=0) == 0:
        run_rows += valid.to(tl.int32)
        sites = _add_sites(h, pre, up, valid[:, None], sites, tau, STATS_H, STATS_PRE, STATS_UP, ACC_ROWS)
    else:
        field = num_groups * N
        k = tl.min(tl.where(valid, gid, num_groups), axis=0)
        while k < num_groups:
            in_k = valid & (gid == k)
            take = in_k[:, None]
            if k != run_k:
                touched = flush_run((run_k, run_rows, touched), sites, part_ptr, pre_site_offset, up_site_offset,
                                    field, N, cols, col_ok, STATS_H, STATS_PRE, STATS_UP)
                h_state, pre_state, up_state = sites
                if STATS_H:  # (state of a site not gathered is never reassigned: the compiler drops it)
                    h_state = _new_run_state(h, take, part_ptr, k, touched, field, N, cols, col_ok, ACC_ROWS, BLOCK_N)
                if STATS_PRE:
                    pre_state = _new_run_state(pre, take, part_ptr + pre_site_offset, k, touched, field, N, cols,
                                               col_ok, ACC_ROWS, BLOCK_N)
                if STATS_UP:
                    up_state = _new_run_state(up, take, part_ptr + up_site_offset, k, touched, field, N, cols,
                                              col_ok, ACC_ROWS, BLOCK_N)
                sites = (h_state, pre_state, up_state)
                run_k = k
                run_rows = tl.zeros_like(run_rows)
            run_rows += in_k.to(tl.int32)
            sites = _add_sites(h, pre, up, take, sites, tau, STATS_H, STATS_PRE, STATS_UP, ACC_ROWS)
            k = tl.min(tl.where(valid & (gid > k), gid, num_groups), axis=0)
    return (run_k, run_rows, touched), sites


@triton.jit
def store_hidden(h, keep, rows, row_ok, cols, col_ok, out_ptr, N,
                 HAS_KEEP: tl.constexpr, WRITE_OUT: tl.constexpr, RTNE_BF16: tl.constexpr):
    """Neuron mask and store of one (BLOCK_T, BLOCK_N) tile of h into the contiguous (T, N) output; returns the
    masked tile. ``keep`` (BLOCK_N,) is read only when HAS_KEEP."""
    if HAS_KEEP:
        h = tl.where(keep[None, :], h, 0.0)
    if WRITE_OUT:
        rows64 = rows.to(tl.int64)
        tl.store(out_ptr + rows64[:, None] * N + cols[None, :], to_output_dtype(h, out_ptr, RTNE_BF16),
                 mask=row_ok[:, None] & col_ok[None, :])
    return h


@triton.jit
def start_statistics(ACC_ROWS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """The initial ``(run, sites)`` of a program: no run, no group touched, empty (hidden, pre, up) states."""
    state = _empty_state(ACC_ROWS, BLOCK_N)
    return (tl.full([], -1, tl.int32), tl.zeros([BLOCK_T], dtype=tl.int32), tl.zeros([], dtype=tl.int64)), \
        (state, state, state)


@triton.jit
def load_groups(gid_ptr, rows, row_ok, num_groups, HAS_GID: tl.constexpr, BLOCK_T: tl.constexpr):
    """(group id, counted) of a tile's rows: ids outside [0, G), -1 (ignore) and rows past the chunk are not counted."""
    if HAS_GID:
        gid = tl.load(gid_ptr + rows, mask=row_ok, other=-1)
    else:
        gid = tl.zeros([BLOCK_T], dtype=tl.int32)
    return gid, row_ok & (gid >= 0) & (gid < num_groups)


# ---- the on-device merge of the partials into the float64 accumulators ----

@triton.jit
def merge_kernel(scratch_ptr, touched_ptr, acc_h_ptr, acc_pre_ptr, acc_up_ptr, N, num_groups, num_chunks,
                 num_neuron_blocks, part_stride, site_stride, BLOCK_N: tl.constexpr):
    """Program (neuron block, group, site): fold the chunk partials that wrote this group, in chunk order, into the
    float64 accumulator block with Chan's formula. Accumulators of groups no chunk met are not touched."""
    pid_n = tl.program_id(0)
    k = tl.program_id(1)
    site = tl.program_id(2)
    if site == 0:
        acc_ptr = acc_h_ptr
    elif site == 1:
        acc_ptr = acc_pre_ptr
    else:
        acc_ptr = acc_up_ptr
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    field = num_groups * N
    any_chunk = tl.zeros([], dtype=tl.int64)
    for c in range(num_chunks):
        any_chunk = any_chunk | tl.load(touched_ptr + c * num_neuron_blocks + pid_n)
    if _group_bit(any_chunk, k):
        a = acc_ptr + k * N + cols
        n = tl.load(a + A_COUNT * field, mask=col_ok, other=0.0)
        mean = tl.load(a + A_MEAN * field, mask=col_ok, other=0.0)
        m2 = tl.load(a + A_M2 * field, mask=col_ok, other=0.0)
        sum_abs = tl.load(a + A_SUM_ABS * field, mask=col_ok, other=0.0)
        sum_sq = tl.load(a + A_SUM_SQ * field, mask=col_ok, other=0.0)
        active = tl.load(a + A_ACTIVE * field, mask=col_ok, other=0.0)
        nonfinite = tl.load(a + A_NONFINITE * field, mask=col_ok, other=0.0)
        for c in range(num_chunks):
            if _group_bit(tl.load(touched_ptr + c * num_neuron_blocks + pid_n), k):
                p = scratch_ptr + site * site_stride + c * part_stride + k * N + cols
                n_b = tl.load(p + P_COUNT * field, mask=col_ok, other=0.0).to(tl.float64)
                shift = tl.load(p + P_SHIFT * field, mask=col_ok, other=0.0).to(tl.float64)
                s1 = tl.load(p + P_S1 * field, mask=col_ok, other=0.0).to(tl.float64)
                s2 = tl.load(p + P_S2 * field, mask=col_ok, other=0.0).to(tl.float64)
                safe = tl.maximum(n_b, 1.0)
                mean_b = tl.where(n_b > 0, shift + s1 / safe, 0.0)
                m2_b = tl.where(n_b > 0, tl.maximum(s2 - s1 * s1 / safe, 0.0), 0.0)
                total = n + n_b
                delta = mean_b - mean
                w_b = n_b / tl.maximum(total, 1.0)
                m2 = m2 + m2_b + delta * delta * n * w_b
                mean = mean + delta * w_b
                n = total
                sum_sq += n_b * shift * shift + 2.0 * shift * s1 + s2
                sum_abs += tl.load(p + P_SUM_ABS * field, mask=col_ok, other=0.0).to(tl.float64)
                active += tl.load(p + P_ACTIVE * field, mask=col_ok, other=0.0).to(tl.float64)
                nonfinite += tl.load(p + P_NONFINITE * field, mask=col_ok, other=0.0).to(tl.float64)
        tl.store(a + A_COUNT * field, n, mask=col_ok)
        tl.store(a + A_MEAN * field, mean, mask=col_ok)
        tl.store(a + A_M2 * field, m2, mask=col_ok)
        tl.store(a + A_SUM_ABS * field, sum_abs, mask=col_ok)
        tl.store(a + A_SUM_SQ * field, sum_sq, mask=col_ok)
        tl.store(a + A_ACTIVE * field, active, mask=col_ok)
        tl.store(a + A_NONFINITE * field, nonfinite, mask=col_ok)


# ---- host side ----

def rtne_by_hand(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and interpreting()


def fp32_threshold(tau: float) -> float:
    """The largest fp32 value <= tau. For any fp32 x, ``x > fp32_threshold(tau)`` equals the float64 test
    ``x > tau`` of the reference (a plain fp32 cast of tau may round up and miss values just above tau)."""
    lo = np.float32(tau)
    if float(lo) > tau:
        lo = np.nextafter(lo, np.float32(-np.inf))
    return float(lo)


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return _num_sms_cuda(device.index if device.index is not None else torch.cuda.current_device())


_SM_COUNTS: dict[int, int] = {}


def _num_sms_cuda(index: int) -> int:
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def plan_chunks(num_tokens: int, block_t: int, num_neuron_blocks: int, device: torch.device,
                tiles_per_chunk: int | None = None, min_chunks: int = 1) -> tuple[int, int]:
    """(tiles per chunk, number of chunks C) for a (neuron blocks, C) grid.

    Aims for PROGRAMS_PER_SM programs per SM (one program per neuron block on CPU/interpreter) and at least
    ``min_chunks`` chunks on CUDA (the GEMM's weight-reuse factor, see gated_gemm.py), keeps every
    chunk under MAX_CHUNK_TOKENS so fp32 counts stay exact. Depends only on the shape and the device, so a
    given input always gets the same configuration (and therefore bit-identical statistics).
    """
    tiles = triton.cdiv(num_tokens, block_t)
    if tiles_per_chunk is None:
        want_chunks = max(1, triton.cdiv(PROGRAMS_PER_SM * num_sms(device), num_neuron_blocks))
        if device.type == "cuda":
            want_chunks = max(want_chunks, min_chunks)
        tiles_per_chunk = triton.cdiv(tiles, want_chunks)
    tiles_per_chunk = max(1, min(tiles_per_chunk, MAX_CHUNK_TOKENS // block_t))
    return tiles_per_chunk, triton.cdiv(tiles, tiles_per_chunk)


def act_code(act: str) -> int:
    return ACT_CODES[check_activation(act)]


def group_args(gid, device):
    """(pointer tensor, HAS_GID) for the kernels; gid None puts every token in group 0."""
    if gid is None:
        return _placeholder(device, torch.int32), False
    return gid.contiguous(), True


def keep_args(keep, device):
    """(pointer tensor, HAS_KEEP): the bool mask itself (Triton reads torch.bool as int1, no copy)."""
    if keep is None:
        return _placeholder(device, torch.bool), False
    return keep.contiguous(), True


_PLACEHOLDERS: dict = {}


def _placeholder(device, dtype) -> torch.Tensor:
    """A one-element tensor standing in for an absent pointer argument (never read), allocated once."""
    key = (str(device), dtype)
    if key not in _PLACEHOLDERS:
        _PLACEHOLDERS[key] = torch.zeros(1, dtype=dtype, device=device)
    return _PLACEHOLDERS[key]


_SCRATCH: dict = {}


def _stream_key(device) -> tuple:
    if device.type == "cuda":
        return str(device), torch.cuda.current_stream(device).cuda_stream
    return str(device), 0


class Statistics:
    """Host side of the statistics of one launch: the scratch slices of the partials, the touched masks and
    the merge. The scratch is reused across calls (per device and CUDA stream: calls on one stream run in
    order, so a call's merge has read the scratch before the next call's kernel writes it)."""

    def __init__(self, accs, num_groups: int, n: int, num_chunks: int, num_neuron_blocks: int, device):
        if num_groups > MAX_GROUPS:
            raise ValueError(f"the Triton kernels take at most {MAX_GROUPS} token groups per call, got {num_groups}")
        self.accs = accs
        self.sites = [a for a in accs if a is not None]
        self.part_stride = PARTIAL_FIELDS * num_groups * n
        self.site_stride = num_chunks * self.part_stride
        self.num_groups, self.n, self.num_chunks, self.num_neuron_blocks = num_groups, n, num_chunks, num_neuron_blocks
        need = max(len(self.sites), 1) * self.site_stride
        key = _stream_key(device)
        scratch, touched = _SCRATCH.get(key, (None, None))
        if scratch is None or scratch.numel() < need or touched.numel() < num_chunks * num_neuron_blocks:
            scratch = torch.empty(max(need, 0 if scratch is None else scratch.numel()), dtype=torch.float32,
                                  device=device)
            touched = torch.empty(max(num_chunks * num_neuron_blocks, 0 if touched is None else touched.numel()),
                                  dtype=torch.int64, device=device)
            _SCRATCH[key] = scratch, touched
        self.scratch, self.touched = scratch, touched

    def kernel_args(self) -> tuple:
        """(scratch, touched, elements per chunk partial, offset of the pre site, offset of the up site): sites are
        packed in (hidden, pre, up) order, skipping those without an accumulator."""
        pre_offset = self.site_stride * (self.accs[0] is not None)
        up_offset = pre_offset + self.site_stride * (self.accs[1] is not None)
        return self.scratch, self.touched, self.part_stride, pre_offset, up_offset

    def merge(self, block_n: int) -> None:
        """Fold the partials into the float64 accumulators, one launch for every site."""
        if not self.sites:
            return
        ptrs = list(self.sites) + [self.sites[0]] * (3 - len(self.sites))
        merge_kernel[(self.num_neuron_blocks, self.num_groups, len(self.sites))](
            self.scratch, self.touched, *ptrs, self.n, self.num_groups, self.num_chunks, self.num_neuron_blocks,
            self.part_stride, self.site_stride, BLOCK_N=block_n)
