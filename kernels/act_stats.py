"""Elementwise fused kernel: h = act(pre) [* up], neuron mask, optional write of h, segmented statistics of h
(and of pre/up on request) in one read of the inputs. The ``triton`` backend of ``manu_fast.ops.act_stats``
(contract in docs/OPS.md); the statistics scheme is in kernels/common.py and kernels/README.md."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from manu_fast.backends.contract import check_backend_args

from .common import (Statistics, act_code, apply_activation, chunk_token_range, flush_run, fp32_threshold,
                     group_args, interpreting, keep_args, load_groups, plan_chunks, rtne_by_hand, start_statistics,
                     statistics_step, store_hidden)


@triton.jit
def _act_stats_kernel(
    pre_ptr, up_ptr, out_ptr, keep_ptr, gid_ptr, scratch_ptr, touched_ptr,
    T, N, num_groups, tiles_per_chunk, tau,
    stride_pre_t, stride_pre_n, stride_up_t, stride_up_n,
    part_stride, pre_site_offset, up_site_offset,
    ACT: tl.constexpr, HAS_UP: tl.constexpr, HAS_KEEP: tl.constexpr, HAS_GID: tl.constexpr,
    WRITE_OUT: tl.constexpr, STATS_H: tl.constexpr, STATS_PRE: tl.constexpr, STATS_UP: tl.constexpr,
    RTNE_BF16: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, ACC_ROWS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    keep = col_ok  # placeholder when there is no mask (read only under HAS_KEEP)
    if HAS_KEEP:
        keep = tl.load(keep_ptr + cols, mask=col_ok, other=0) != 0
    part_ptr = scratch_ptr + chunk * part_stride  # this program's partials: hidden here, pre/up at the offsets
    run, sites = start_statistics(ACC_ROWS, BLOCK_T, BLOCK_N)
    t_begin, t_end = chunk_token_range(chunk, tiles_per_chunk, T, BLOCK_T)
    for t0 in range(t_begin, t_end, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        row_ok = rows < t_end
        rows64 = rows.to(tl.int64)
        mask = row_ok[:, None] & col_ok[None, :]
        p = tl.load(pre_ptr + rows64[:, None] * stride_pre_t + cols[None, :] * stride_pre_n, mask=mask, other=0.0)
        p = p.to(tl.float32)
        h = apply_activation(p, ACT)
        u = p  # placeholder for a plain MLP (read only under STATS_UP)
        if HAS_UP:
            u = tl.load(up_ptr + rows64[:, None] * stride_up_t + cols[None, :] * stride_up_n, mask=mask, other=0.0)
            u = u.to(tl.float32)
            h = h * u
        h = store_hidden(h, keep, rows, row_ok, cols, col_ok, out_ptr, N, HAS_KEEP, WRITE_OUT, RTNE_BF16)
        if STATS_H or STATS_PRE or STATS_UP:
            gid, valid = load_groups(gid_ptr, rows, row_ok, num_groups, HAS_GID, BLOCK_T)
            run, sites = statistics_step(h, p, u, gid, valid, run, sites, part_ptr, pre_site_offset, up_site_offset,
                                         num_groups, N, cols, col_ok, tau, STATS_H, STATS_PRE, STATS_UP, ACC_ROWS,
                                         BLOCK_N)
    if STATS_H or STATS_PRE or STATS_UP:
        touched = flush_run(run, sites, part_ptr, pre_site_offset, up_site_offset, num_groups * N, N, cols, col_ok,
                            STATS_H, STATS_PRE, STATS_UP)
        tl.store(touched_ptr + chunk * tl.num_programs(0) + pid_n, touched)


def default_config(n: int, sites: int) -> dict:
    """Launch configuration: (BLOCK_T, BLOCK_N, ACC_ROWS, num_warps). On a GPU (not yet tuned on hardware:
    benchmarks/gpu_check.sh sweeps the alternatives) 32 x 64 tiles keep one elementwise accumulator per tile
    position for a single site (5 x 16 registers per thread at 4 warps) and reduce per tile when pre/up are
    gathered too; under the interpreter every tl op costs Python time, so tiles are as large as the tensor allows."""
    if interpreting():
        return dict(block_t=16, block_n=min(128, triton.next_power_of_2(max(n, 1))), acc_rows=16, num_warps=4)
    return dict(block_t=32, block_n=64, acc_rows=32 if sites <= 1 else 1, num_warps=4)


def act_stats_triton(pre, up, act, keep, gid, num_groups, tau, hidden_acc, pre_acc, up_acc, write_out, *,
                     block_t: int | None = None, block_n: int | None = None, tiles_per_chunk: int | None = None,
                     acc_rows: int | None = None, num_warps: int | None = None):
    """Triton backend of ``manu_fast.ops.act_stats`` (see the backend contract in docs/OPS.md).

    Keyword arguments override the launch configuration (``default_config``): tests use them to cover several
    chunks, partial tiles and both accumulator layouts (``acc_rows`` = ``block_t`` or 1); statistics are
    bit-identical for a fixed configuration. Launches the kernel and, when statistics are gathered, the merge.
    """
    check_backend_args(pre, up, act, keep, gid, num_groups, hidden_acc, pre_acc, up_acc)
    T, N = pre.shape
    device = pre.device
    out = torch.empty((T, N), dtype=pre.dtype, device=device) if write_out else None
    accs = (hidden_acc, pre_acc, up_acc)
    if T == 0 or N == 0 or (out is None and all(a is None for a in accs)):
        return out
    cfg = default_config(N, sum(a is not None for a in accs))
    block_t, block_n = block_t or cfg["block_t"], block_n or cfg["block_n"]
    acc_rows = acc_rows or (block_t if cfg["acc_rows"] > 1 else 1)
    gid_t, has_gid = group_args(gid, device)
    keep_t, has_keep = keep_args(keep, device)
    n_blocks = triton.cdiv(N, block_n)
    tiles_per_chunk, chunks = plan_chunks(T, block_t, n_blocks, device, tiles_per_chunk)
    stats = Statistics(accs, num_groups, N, chunks, n_blocks, device)
    scratch, touched, *offsets = stats.kernel_args()
    up_arg = up if up is not None else pre
    _act_stats_kernel[(n_blocks, chunks)](
        pre, up_arg, out if out is not None else pre, keep_t, gid_t, scratch, touched,
        T, N, num_groups, tiles_per_chunk, fp32_threshold(tau),
        pre.stride(0), pre.stride(1), up_arg.stride(0), up_arg.stride(1), *offsets,
        ACT=act_code(act), HAS_UP=up is not None, HAS_KEEP=has_keep, HAS_GID=has_gid,
        WRITE_OUT=out is not None, STATS_H=hidden_acc is not None, STATS_PRE=pre_acc is not None,
        STATS_UP=up_acc is not None, RTNE_BF16=rtne_by_hand(pre.dtype), BLOCK_T=block_t, BLOCK_N=block_n,
        ACC_ROWS=acc_rows, num_warps=num_warps or cfg["num_warps"],
    )
    stats.merge(block_n)
    return out
