"""Pieces shared by the Triton kernels: activations, the per-tile statistics epilogue, launch planning and
the exact host-side merge of the per-chunk partial statistics.

Statistics scheme (both kernels): the grid is (neuron blocks, token chunks). A program walks its chunk one
token tile at a time; for every group present in the tile it computes the tile's statistics two-pass in
registers (count, mean, M2 around the *tile* mean, sum|a|, sum a^2, active count, non-finite count) and
Chan-merges them, in fp32, into its own slice of a scratch buffer (SITES, C, NUM_FIELDS, G, N). Each slice
belongs to exactly one program, so the read-modify-write is race free and the reduction order is fixed:
results are bit-identical for the same inputs and launch configuration. The host then merges the C chunk
partials into the float64 accumulators with ``manu_fast.stats.merge_into`` (exact Chan merge).
Because each tile's M2 is taken around its own mean, the variance stays accurate when |mean| >> std.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import triton
import triton.language as tl

from manu_fast.activations import ACT_CODES, check_activation
from manu_fast.schema import NUM_FIELDS
from manu_fast.stats import merge_into

# fp32 counts are exact below 2**24; a chunk never holds more tokens than this.
MAX_CHUNK_TOKENS = 1 << 22
# Programs per SM the chunking aims for (enough to hide memory latency; more only grows the scratch).
PROGRAMS_PER_SM = 4

ACT_SILU = tl.constexpr(ACT_CODES["silu"])
ACT_GELU = tl.constexpr(ACT_CODES["gelu"])
ACT_GELU_TANH = tl.constexpr(ACT_CODES["gelu_tanh"])
ACT_QUICK_GELU = tl.constexpr(ACT_CODES["quick_gelu"])
ACT_RELU = tl.constexpr(ACT_CODES["relu"])
ACT_IDENTITY = tl.constexpr(ACT_CODES["identity"])


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
def accumulate_tile_stats(x, gid, row_ok, cols, col_ok, part_ptr, num_groups, N, tau):
    """Merge the statistics of tile ``x`` (BLOCK_T, BLOCK_N) fp32 into the partial block at ``part_ptr``.

    ``part_ptr`` points at this program's (NUM_FIELDS, G, N) fp32 slice; fields in manu_fast.stats.FIELDS
    order: count, mean, m2, sum_abs, sum_sq, active, nonfinite. Rows with ``row_ok`` False or a group id
    outside [0, G) are ignored; groups absent from the tile are skipped.
    """
    field = num_groups * N
    finite = tl.abs(x) < float("inf")  # False for NaN and +-Inf
    for k in range(num_groups):
        in_k = (gid == k) & row_ok
        if tl.sum(in_k.to(tl.int32), axis=0) > 0:
            fin = in_k[:, None] & finite
            x0 = tl.where(fin, x, 0.0)
            n_b = tl.sum(fin.to(tl.float32), axis=0)
            mean_b = tl.sum(x0, axis=0) / tl.maximum(n_b, 1.0)
            dev = tl.where(fin, x - mean_b[None, :], 0.0)
            m2_b = tl.sum(dev * dev, axis=0)
            sum_abs_b = tl.sum(tl.abs(x0), axis=0)
            sum_sq_b = tl.sum(x0 * x0, axis=0)
            active_b = tl.sum((fin & (tl.abs(x0) > tau)).to(tl.float32), axis=0)
            nonfinite_b = tl.sum((in_k[:, None] & ~finite).to(tl.float32), axis=0)

            p = part_ptr + k * N + cols
            n_a = tl.load(p, mask=col_ok, other=0.0)
            mean_a = tl.load(p + field, mask=col_ok, other=0.0)
            m2_a = tl.load(p + 2 * field, mask=col_ok, other=0.0)
            n = n_a + n_b
            delta = mean_b - mean_a
            w_b = n_b / tl.maximum(n, 1.0)
            tl.store(p, n, mask=col_ok)
            tl.store(p + field, mean_a + delta * w_b, mask=col_ok)
            tl.store(p + 2 * field, m2_a + m2_b + delta * delta * n_a * w_b, mask=col_ok)
            tl.store(p + 3 * field, tl.load(p + 3 * field, mask=col_ok, other=0.0) + sum_abs_b, mask=col_ok)
            tl.store(p + 4 * field, tl.load(p + 4 * field, mask=col_ok, other=0.0) + sum_sq_b, mask=col_ok)
            tl.store(p + 5 * field, tl.load(p + 5 * field, mask=col_ok, other=0.0) + active_b, mask=col_ok)
            tl.store(p + 6 * field, tl.load(p + 6 * field, mask=col_ok, other=0.0) + nonfinite_b, mask=col_ok)


@triton.jit
def chunk_token_range(chunk, tiles_per_chunk, T, BLOCK_T: tl.constexpr):
    """[begin, end) of the tokens that token chunk ``chunk`` walks (``tiles_per_chunk`` tiles, see plan_chunks)."""
    t_begin = chunk * tiles_per_chunk * BLOCK_T
    return t_begin, tl.minimum(t_begin + tiles_per_chunk * BLOCK_T, T)


@triton.jit
def hidden_tile_epilogue(h, pre, up, keep, rows, row_ok, cols, col_ok, out_ptr, gid_ptr, part_ptr,
                         pre_site_offset, up_site_offset, num_groups, N, tau,
                         HAS_KEEP: tl.constexpr, WRITE_OUT: tl.constexpr, HAS_GID: tl.constexpr,
                         STATS_H: tl.constexpr, STATS_PRE: tl.constexpr, STATS_UP: tl.constexpr,
                         RTNE_BF16: tl.constexpr, BLOCK_T: tl.constexpr):
    """The tail both kernels share for one (BLOCK_T, BLOCK_N) tile of h = act(pre) [* up] (all fp32): neuron
    mask, store of h into the contiguous (T, N) output, and the statistics of h, pre and up into this program's
    partial slices (hidden at ``part_ptr``, pre/up at the site offsets, see ``scratch_offsets``).

    ``keep`` (BLOCK_N,) is read only when HAS_KEEP and ``up`` only when STATS_UP: callers without them pass
    any tile of the right type in their place.
    """
    if HAS_KEEP:
        h = tl.where(keep[None, :], h, 0.0)
    if WRITE_OUT:
        rows64 = rows.to(tl.int64)
        tl.store(out_ptr + rows64[:, None] * N + cols[None, :], to_output_dtype(h, out_ptr, RTNE_BF16),
                 mask=row_ok[:, None] & col_ok[None, :])
    if HAS_GID:
        gid = tl.load(gid_ptr + rows, mask=row_ok, other=-1)
    else:
        gid = tl.zeros([BLOCK_T], dtype=tl.int32)
    if STATS_H:
        accumulate_tile_stats(h, gid, row_ok, cols, col_ok, part_ptr, num_groups, N, tau)
    if STATS_PRE:
        accumulate_tile_stats(pre, gid, row_ok, cols, col_ok, part_ptr + pre_site_offset, num_groups, N, tau)
    if STATS_UP:
        accumulate_tile_stats(up, gid, row_ok, cols, col_ok, part_ptr + up_site_offset, num_groups, N, tau)


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
    return torch.cuda.get_device_properties(device).multi_processor_count


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
        return torch.empty(1, dtype=torch.int32, device=device), False
    return gid.contiguous(), True


def keep_args(keep, device):
    if keep is None:
        return torch.empty(1, dtype=torch.uint8, device=device), False
    return keep.to(dtype=torch.uint8).contiguous(), True


def new_scratch(accs, num_chunks: int, num_groups: int, n: int, device) -> torch.Tensor:
    """Zeroed fp32 partials (SITES, C, NUM_FIELDS, G, N), one site per accumulator that is not None."""
    sites = sum(a is not None for a in accs)
    return torch.zeros(max(sites, 1), num_chunks, NUM_FIELDS, num_groups, n, dtype=torch.float32, device=device)


def scratch_offsets(scratch: torch.Tensor, accs) -> tuple[int, int, int]:
    """(elements per chunk partial, offset of the pre site, offset of the up site) in the scratch buffer;
    sites are packed in (hidden, pre, up) order, skipping those without an accumulator."""
    site_stride = scratch[0].numel()
    pre_offset = site_stride * (accs[0] is not None)
    up_offset = pre_offset + site_stride * (accs[1] is not None)
    return scratch[0, 0].numel(), pre_offset, up_offset


def merge_scratch(scratch: torch.Tensor, accs) -> None:
    """Exact float64 merge of each site's C partials into its accumulator (in place), fixed order."""
    site = 0
    for acc in accs:
        if acc is None:
            continue
        merge_into(acc, scratch[site])
        site += 1
