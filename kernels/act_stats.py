"""Elementwise fused kernel: h = act(pre) [* up], neuron mask, optional write of h, segmented statistics of h
(and of pre/up on request) in one read of the inputs. Implements the backend contract of manu_fast.ops."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from manu_fast.schema import check_backend_args
from .common import (act_code, apply_activation, chunk_token_range, fp32_threshold, group_args,
                     hidden_tile_epilogue, interpreting, keep_args, merge_scratch, new_scratch, plan_chunks,
                     rtne_by_hand, scratch_offsets)


@triton.jit
def _act_stats_kernel(
    pre_ptr, up_ptr, out_ptr, keep_ptr, gid_ptr, scratch_ptr,
    T, N, num_groups, tiles_per_chunk, tau,
    stride_pre_t, stride_pre_n, stride_up_t, stride_up_n,
    part_stride, pre_site_offset, up_site_offset,
    ACT: tl.constexpr, HAS_UP: tl.constexpr, HAS_KEEP: tl.constexpr, HAS_GID: tl.constexpr,
    WRITE_OUT: tl.constexpr, STATS_H: tl.constexpr, STATS_PRE: tl.constexpr, STATS_UP: tl.constexpr,
    RTNE_BF16: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    keep = col_ok  # placeholder for the epilogue when there is no mask (it reads keep only under HAS_KEEP)
    if HAS_KEEP:
        keep = tl.load(keep_ptr + cols, mask=col_ok, other=0) != 0
    # This program's partial blocks (NUM_FIELDS, G, N): one per site, at site offset + chunk * part_stride.
    part_ptr = scratch_ptr + chunk * part_stride
    t_begin, t_end = chunk_token_range(chunk, tiles_per_chunk, T, BLOCK_T)
    for t0 in range(t_begin, t_end, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        row_ok = rows < t_end
        rows64 = rows.to(tl.int64)
        mask = row_ok[:, None] & col_ok[None, :]
        p = tl.load(pre_ptr + rows64[:, None] * stride_pre_t + cols[None, :] * stride_pre_n, mask=mask, other=0.0)
        p = p.to(tl.float32)
        h = apply_activation(p, ACT)
        u = p  # placeholder for the epilogue of a plain MLP (it reads up only under STATS_UP)
        if HAS_UP:
            u = tl.load(up_ptr + rows64[:, None] * stride_up_t + cols[None, :] * stride_up_n, mask=mask, other=0.0)
            u = u.to(tl.float32)
            h = h * u
        hidden_tile_epilogue(h, p, u, keep, rows, row_ok, cols, col_ok, out_ptr, gid_ptr, part_ptr,
                             pre_site_offset, up_site_offset, num_groups, N, tau,
                             HAS_KEEP, WRITE_OUT, HAS_GID, STATS_H, STATS_PRE, STATS_UP, RTNE_BF16, BLOCK_T)


def _default_blocks(n: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_N, num_warps). GPU values are a memory-bound default (not yet tuned on hardware);
    under the interpreter every tl op costs Python time, so tiles there are as large as the tensor allows."""
    if interpreting():
        return 16, min(128, triton.next_power_of_2(max(n, 1))), 4
    return 64, 64, 4


def act_stats_triton(pre, up, act, keep, gid, num_groups, tau, hidden_acc, pre_acc, up_acc, write_out, *,
                     block_t: int | None = None, block_n: int | None = None, tiles_per_chunk: int | None = None):
    """Triton backend of ``manu_fast.ops.act_stats`` (see the backend contract there).

    ``block_t``/``block_n``/``tiles_per_chunk`` override the launch configuration (tests use them to cover
    several chunks and partial tiles); statistics are bit-identical for a fixed configuration.
    """
    check_backend_args(pre, up, act, keep, gid, num_groups, hidden_acc, pre_acc, up_acc)
    T, N = pre.shape
    device = pre.device
    out = torch.empty((T, N), dtype=pre.dtype, device=device) if write_out else None
    accs = (hidden_acc, pre_acc, up_acc)
    if T == 0 or N == 0 or (out is None and all(a is None for a in accs)):
        return out
    default_t, default_n, num_warps = _default_blocks(N)
    block_t, block_n = block_t or default_t, block_n or default_n
    gid_t, has_gid = group_args(gid, device)
    keep_t, has_keep = keep_args(keep, device)
    n_blocks = triton.cdiv(N, block_n)
    tiles_per_chunk, chunks = plan_chunks(T, block_t, n_blocks, device, tiles_per_chunk)
    scratch = new_scratch(accs, chunks, num_groups, N, device)
    up_arg = up if up is not None else pre
    _act_stats_kernel[(n_blocks, chunks)](
        pre, up_arg, out if out is not None else pre, keep_t, gid_t, scratch,
        T, N, num_groups, tiles_per_chunk, fp32_threshold(tau),
        pre.stride(0), pre.stride(1), up_arg.stride(0), up_arg.stride(1),
        *scratch_offsets(scratch, accs),
        ACT=act_code(act), HAS_UP=up is not None, HAS_KEEP=has_keep, HAS_GID=has_gid,
        WRITE_OUT=out is not None, STATS_H=hidden_acc is not None, STATS_PRE=pre_acc is not None,
        STATS_UP=up_acc is not None, RTNE_BF16=rtne_by_hand(pre.dtype), BLOCK_T=block_t, BLOCK_N=block_n,
        num_warps=num_warps,
    )
    merge_scratch(scratch, accs)
    return out
