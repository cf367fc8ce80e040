"""Fused gated-MLP front half: g = x W_gate^T + b_gate and u = x W_up^T + b_up in one Triton matmul whose
epilogue computes h = act(g) * u, applies the neuron mask, writes h and accumulates the segmented statistics
of h (and of g/u on request). g and u never go to memory.

Programs: one per (neuron block, token chunk); a program walks the BLOCK_M token tiles of its chunk with the run
statistics of the elementwise kernel (kernels/common.py; here reduced per tile, ACC_ROWS = 1, since the two
fp32 GEMM accumulators already take the registers), so the statistics are deterministic. The 1-D launch order puts the chunk index fastest: the C programs of one
neuron block run side by side and share each weight slab through L2, so the weights are read from memory
about T / (BLOCK_M * C) times (C >= GEMM_MIN_CHUNKS on CUDA) rather than once per token tile.

When to use it instead of cuBLAS + the elementwise kernel: see ``prefer_fused_gemm``.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from manu_fast.backends.contract import check_launch_args, check_linear, linear_then_act_stats
from .act_stats import act_stats_triton
from .common import (Statistics, act_code, apply_activation, chunk_token_range, flush_run, fp32_threshold,
                     group_args, interpreting, keep_args, load_groups, plan_chunks, rtne_by_hand, start_statistics,
                     statistics_step, store_hidden)

GATED_PATH_ENV = "MANU_FAST_GATED_PATH"  # "fused" | "unfused" | "auto" (default)
FUSED_MAX_D_ENV = "MANU_FAST_FUSED_MAX_D"
FUSED_MAX_D_DEFAULT = 0  # auto never fuses until a measurement shows where the fused GEMM wins
FUSED_MIN_TOKENS = 128
GEMM_MIN_CHUNKS = 8


def prefer_fused_gemm(num_tokens: int, d_model: int, n_inter: int) -> bool:
    """Use the fused GEMM for this shape? ``MANU_FAST_GATED_PATH=fused|unfused`` forces a path; ``auto`` (default)
    fuses when ``d_model <= MANU_FAST_FUSED_MAX_D`` and ``num_tokens >= FUSED_MIN_TOKENS``.

    The default bound is 0 (auto never fuses) until the rebuilt kernels are measured on a GPU: the only measurement,
    of the kernels before the rework (H200, bf16, LLaVA-7B's 4096 -> 11008 MLP: fused GEMM 2.02x the plain MLP,
    cuBLAS + the elementwise kernel 1.57x, docs/BENCHMARKS.md), says nothing about the current ones.
    ``benchmarks/gated_paths.py`` (run by ``benchmarks/gpu_check.sh``) times both paths at D = 1024, 2048 and 4096;
    the crossover it finds on the target GPU is the value to set here (or in the environment).
    Below FUSED_MIN_TOKENS tokens the GEMMs are weight-bandwidth bound and cuBLAS's small-M kernels win.
    """
    mode = os.environ.get(GATED_PATH_ENV, "auto")
    if mode == "fused":
        return True
    if mode == "unfused":
        return False
    if mode != "auto":
        raise ValueError(f"{GATED_PATH_ENV}={mode!r}; expected fused, unfused or auto")
    max_d = int(os.environ.get(FUSED_MAX_D_ENV, FUSED_MAX_D_DEFAULT))
    return d_model <= max_d and num_tokens >= FUSED_MIN_TOKENS


@triton.jit
def _gated_gemm_act_stats_kernel(
    x_ptr, wg_ptr, bg_ptr, wu_ptr, bu_ptr, out_ptr, keep_ptr, gid_ptr, scratch_ptr, touched_ptr,
    T, N, D, num_groups, num_chunks, tiles_per_chunk, tau,
    stride_xt, stride_xd, stride_wgn, stride_wgd, stride_wun, stride_wud,
    part_stride, pre_site_offset, up_site_offset,
    ACT: tl.constexpr, HAS_BIAS_G: tl.constexpr, HAS_BIAS_U: tl.constexpr, HAS_KEEP: tl.constexpr,
    HAS_GID: tl.constexpr, STATS_H: tl.constexpr, STATS_PRE: tl.constexpr, STATS_UP: tl.constexpr,
    DOT_FP32: tl.constexpr, RTNE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_n = pid // num_chunks
    chunk = pid % num_chunks
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    keep = col_ok  # placeholder when there is no mask (read only under HAS_KEEP)
    if HAS_KEEP:
        keep = tl.load(keep_ptr + cols, mask=col_ok, other=0) != 0
    if HAS_BIAS_G:
        bias_g = tl.load(bg_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_BIAS_U:
        bias_u = tl.load(bu_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    part_ptr = scratch_ptr + chunk * part_stride
    run, sites = start_statistics(1, BLOCK_M, BLOCK_N)
    # Weight tiles are read transposed, (BLOCK_K, BLOCK_N), straight from the (N, D) nn.Linear layout.
    wg_tile = wg_ptr + cols[None, :].to(tl.int64) * stride_wgn + ks[:, None] * stride_wgd
    wu_tile = wu_ptr + cols[None, :].to(tl.int64) * stride_wun + ks[:, None] * stride_wud
    t_begin, t_end = chunk_token_range(chunk, tiles_per_chunk, T, BLOCK_M)
    for t0 in range(t_begin, t_end, BLOCK_M):
        rows = t0 + tl.arange(0, BLOCK_M)
        row_ok = rows < t_end
        rows64 = rows.to(tl.int64)
        x_tile = x_ptr + rows64[:, None] * stride_xt + ks[None, :] * stride_xd
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            k_ok = (k0 + ks) < D
            a = tl.load(x_tile + k0 * stride_xd, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_mask = k_ok[:, None] & col_ok[None, :]
            wg = tl.load(wg_tile + k0 * stride_wgd, mask=w_mask, other=0.0)
            wu = tl.load(wu_tile + k0 * stride_wud, mask=w_mask, other=0.0)
            if DOT_FP32:  # exact fp32 products, like torch's default (TF32 off) fp32 matmul
                a = a.to(tl.float32)
                acc_g = tl.dot(a, wg.to(tl.float32), acc_g, input_precision="ieee")
                acc_u = tl.dot(a, wu.to(tl.float32), acc_u, input_precision="ieee")
            else:
                acc_g = tl.dot(a, wg, acc_g)
                acc_u = tl.dot(a, wu, acc_u)
        if HAS_BIAS_G:
            acc_g += bias_g[None, :]
        if HAS_BIAS_U:
            acc_u += bias_u[None, :]
        h = apply_activation(acc_g, ACT) * acc_u
        h = store_hidden(h, keep, rows, row_ok, cols, col_ok, out_ptr, N, HAS_KEEP, True, RTNE_BF16)
        if STATS_H or STATS_PRE or STATS_UP:
            gid, valid = load_groups(gid_ptr, rows, row_ok, num_groups, HAS_GID, BLOCK_M)
            run, sites = statistics_step(h, acc_g, acc_u, gid, valid, run, sites, part_ptr, pre_site_offset,
                                         up_site_offset, num_groups, N, cols, col_ok, tau, STATS_H, STATS_PRE,
                                         STATS_UP, 1, BLOCK_N)
    if STATS_H or STATS_PRE or STATS_UP:
        touched = flush_run(run, sites, part_ptr, pre_site_offset, up_site_offset, num_groups * N, N, cols, col_ok,
                            STATS_H, STATS_PRE, STATS_UP)
        tl.store(touched_ptr + chunk * (tl.num_programs(0) // num_chunks) + pid_n, touched)


def _dot_in_fp32(dtype: torch.dtype) -> bool:
    """fp32 inputs always; bf16 too under the interpreter, whose bf16 tl.dot returns garbage (triton 3.9).
    bf16 products are exact in fp32, so the upcast changes only the accumulation order."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())


def _default_blocks() -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). The GPU values are the usual Hopper/Ampere bf16
    starting point for two 128x64 fp32 accumulators (not yet tuned on hardware); the interpreter gets the
    smallest legal tl.dot tiles so tiny test shapes still span several tiles and chunks."""
    if interpreting():
        return 16, 16, 16, 4, 1
    return 128, 64, 64, 8, 3


def gated_act_stats_triton(x, w_gate, b_gate, w_up, b_up, act, keep, gid, num_groups, tau, hidden_acc,
                           pre_acc, up_acc, *, block_m: int | None = None, block_n: int | None = None,
                           block_k: int | None = None, tiles_per_chunk: int | None = None):
    """h = act(x W_gate^T + b_gate) * (x W_up^T + b_up) with mask and statistics, fused in one kernel.

    ``x`` (T, D) fp32/fp16/bf16 (any strides), weights (N, D) in the nn.Linear layout, biases (N,) or None,
    other arguments as in the ``act_stats`` backend contract (``pre_acc``/``up_acc`` gather the statistics
    of g/u). Returns h (T, N) contiguous in x.dtype. g and u are kept in fp32 (not rounded to x.dtype).
    """
    if x.dim() != 2 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be a 2-D fp32/fp16/bf16 tensor, got {tuple(x.shape)} {x.dtype}")
    T, D = x.shape
    N = w_gate.shape[0]
    check_linear(w_gate, b_gate, "gate", N, D, x)
    check_linear(w_up, b_up, "up", N, D, x)
    check_launch_args(T, N, x.device, act, keep, gid, num_groups, hidden_acc, pre_acc, up_acc, True)
    device = x.device
    out = torch.empty((T, N), dtype=x.dtype, device=device)
    if T == 0 or N == 0:
        return out
    accs = (hidden_acc, pre_acc, up_acc)
    dm, dn, dk, num_warps, num_stages = _default_blocks()
    block_m, block_n, block_k = block_m or dm, block_n or dn, block_k or dk
    gid_t, has_gid = group_args(gid, device)
    keep_t, has_keep = keep_args(keep, device)
    n_blocks = triton.cdiv(N, block_n)
    tiles_per_chunk, chunks = plan_chunks(T, block_m, n_blocks, device, tiles_per_chunk, GEMM_MIN_CHUNKS)
    stats = Statistics(accs, num_groups, N, chunks, n_blocks, device)
    scratch, touched, *offsets = stats.kernel_args()
    _gated_gemm_act_stats_kernel[(n_blocks * chunks,)](
        x, w_gate, b_gate if b_gate is not None else w_gate, w_up, b_up if b_up is not None else w_up,
        out, keep_t, gid_t, scratch, touched,
        T, N, D, num_groups, chunks, tiles_per_chunk, fp32_threshold(tau),
        x.stride(0), x.stride(1), w_gate.stride(0), w_gate.stride(1), w_up.stride(0), w_up.stride(1), *offsets,
        ACT=act_code(act), HAS_BIAS_G=b_gate is not None, HAS_BIAS_U=b_up is not None, HAS_KEEP=has_keep,
        HAS_GID=has_gid, STATS_H=hidden_acc is not None, STATS_PRE=pre_acc is not None,
        STATS_UP=up_acc is not None, DOT_FP32=_dot_in_fp32(x.dtype), RTNE_BF16=rtne_by_hand(x.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
    )
    stats.merge(block_n)
    return out


def gated_linear_act_stats_triton(x, w_gate, b_gate, w_up, b_up, act, keep, gid, num_groups, tau, hidden_acc,
                                  pre_acc, up_acc):
    """The ``gated_linear_act_stats`` backend contract (docs/OPS.md) on CUDA: the fused GEMM where
    ``prefer_fused_gemm`` picks it for the shape, else cuBLAS projections + ``act_stats_triton``."""
    if prefer_fused_gemm(x.shape[0], x.shape[1], w_gate.shape[0]):
        return gated_act_stats_triton(x, w_gate, b_gate, w_up, b_up, act, keep, gid, num_groups, tau, hidden_acc,
                                      pre_acc, up_acc)
    return linear_then_act_stats(act_stats_triton, x, w_gate, b_gate, w_up, b_up, act, keep, gid, num_groups, tau,
                                 hidden_acc, pre_acc, up_acc)
