"""Kernel-level timing on CUDA: the two ways of running a profiling gated MLP, and the elementwise kernel's
launch configurations.

    python benchmarks/gated_paths.py [--tokens 4096 16384] [--hidden 1024 2048 4096] [--out results.md]

1. **Paths** (bf16, SiLU, 8 token groups, intermediate = 2.6875 x hidden as in LLaVA-7B's 4096 -> 11008):
   ``plain`` = down(act(gate(x)) * up(x)) as HF runs it (no statistics: the lower bound); ``unfused`` = cuBLAS
   gate/up + the Triton act_stats kernel + down; ``fused`` = the fused gate/up GEMM kernel + down. The hidden
   size where ``fused`` stops winning is the value for ``MANU_FAST_FUSED_MAX_D`` (kernels/gated_gemm.py).
2. **Sweep** of ``act_stats_triton``'s launch configuration at 4096 and 16384 x 11008 bf16, 8 groups, statistics of
   h alone and of h, pre and up: (BLOCK_T, BLOCK_N, ACC_ROWS, warps) against plain ``silu(g) * u``; the best rows
   are the defaults to put in ``kernels/act_stats.py:default_config``.

Medians of ``triton.testing.do_bench`` (warm-up excluded), quantiles 0.2/0.8. Prints markdown tables with the
device name and versions; without CUDA it says so and exits 0.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

from peers import llava_like_group_ids  # benchmarks/peers.py (this script runs by path: its folder is on sys.path)

NUM_GROUPS = 8
PATH_ENV = "MANU_FAST_GATED_PATH"
SWEEP = [  # (BLOCK_T, BLOCK_N, ACC_ROWS, num_warps); ACC_ROWS = BLOCK_T: one accumulator per tile position
    (32, 64, 32, 4), (32, 64, 1, 4), (16, 64, 16, 4), (16, 128, 16, 4), (16, 128, 16, 8), (32, 128, 32, 8),
    (8, 128, 8, 4), (64, 64, 1, 4), (64, 64, 1, 8), (32, 128, 1, 4), (64, 128, 1, 8), (16, 256, 16, 8),
]


def _bench(fn, do_bench):
    return do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])


def _with_path(path, fn):
    def run():
        old = os.environ.get(PATH_ENV)
        os.environ[PATH_ENV] = path
        try:
            return fn()
        finally:
            if old is None:
                del os.environ[PATH_ENV]
            else:
                os.environ[PATH_ENV] = old
    return run


def paths(tokens: int, hidden: int, do_bench) -> list[tuple]:
    from manu_fast.activations import ACTIVATIONS
    from manu_fast.ops import gated_linear_act_stats
    from manu_fast.stats import empty_stats

    inter = round(hidden * 11008 / 4096 / 64) * 64
    dev, dtype = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(tokens, hidden, device=dev, dtype=dtype, generator=g)
    w_gate, w_up = (torch.randn(inter, hidden, device=dev, dtype=dtype, generator=g) / hidden ** 0.5 for _ in range(2))
    w_down = torch.randn(hidden, inter, device=dev, dtype=dtype, generator=g) / inter ** 0.5
    gid, acc = llava_like_group_ids(tokens, NUM_GROUPS, dev), empty_stats(NUM_GROUPS, inter, dev)
    silu = ACTIVATIONS["silu"]

    def plain():
        return F.linear(silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)

    def profiling():
        h = gated_linear_act_stats(x, w_gate, None, w_up, None, act="silu", group_ids=gid, stats=acc, backend="triton")
        return F.linear(h, w_down)

    base = _bench(plain, do_bench)
    rows = [(tokens, f"{hidden}->{inter}", "plain (HF, no stats)", base, 1.0)]
    for name in ("unfused", "fused"):
        ms = _bench(_with_path(name, profiling), do_bench)
        rows.append((tokens, f"{hidden}->{inter}", f"profiling {name}", ms, ms[0] / base[0]))
    return rows


def sweep(tokens: int, do_bench) -> list[tuple]:
    from manu_fast.kernels import act_stats_triton
    from manu_fast.stats import empty_stats

    dev, n = torch.device("cuda"), 11008
    g = torch.Generator(device=dev).manual_seed(0)
    pre, up = (torch.randn(tokens, n, device=dev, generator=g).to(torch.bfloat16) for _ in range(2))
    gid = llava_like_group_ids(tokens, NUM_GROUPS, dev)
    accs = [empty_stats(NUM_GROUPS, n, dev) for _ in range(3)]
    base = _bench(lambda: F.silu(pre) * up, do_bench)
    rows = [(tokens, "plain silu(g) * u", "-", base, 1.0)]
    for sites in (1, 3):
        site_accs = accs[:sites] + [None] * (3 - sites)
        for bt, bn, acc_rows, warps in SWEEP:
            def run(bt=bt, bn=bn, acc_rows=acc_rows, warps=warps):
                return act_stats_triton(pre, up, "silu", None, gid, NUM_GROUPS, 0.1, *site_accs, True, block_t=bt,
                                        block_n=bn, acc_rows=acc_rows, num_warps=warps)
            try:
                ms = _bench(run, do_bench)
            except Exception as e:  # a configuration the compiler refuses (e.g. out of registers/shared memory)
                rows.append((tokens, f"{sites} site(s)", f"{bt}x{bn} acc_rows {acc_rows} w{warps}: {type(e).__name__}",
                             (float("nan"),) * 3, float("nan")))
                continue
            rows.append((tokens, f"{sites} site(s)", f"{bt}x{bn} acc_rows {acc_rows} w{warps}", ms, ms[0] / base[0]))
    return rows


def _table(title, head, rows) -> list[str]:
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " | median ms | p20 ms | p80 ms | x plain |",
             "|" + " --- |" * (len(head) + 4)]
    for *cells, (med, p20, p80), ratio in rows:
        lines.append("| " + " | ".join(str(c) for c in cells) + f" | {med:.3f} | {p20:.3f} | {p80:.3f} | {ratio:.3f} |")
    return lines + [""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--hidden", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--no-sweep", action="store_true", help="skip the launch-configuration sweep")
    ap.add_argument("--out", help="also write the markdown tables to this file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gated_paths: no CUDA device, nothing measured")
        return 0
    import triton
    from triton.testing import do_bench

    lines = [f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
             f"bf16, SiLU, {NUM_GROUPS} groups", ""]
    rows = [r for t in args.tokens for d in args.hidden for r in paths(t, d, do_bench)]
    lines += _table("Profiling gated MLP: cuBLAS + act_stats (unfused) vs the fused gate/up GEMM", ["tokens", "shape",
                    "provider"], rows)
    if not args.no_sweep:
        rows = [r for t in args.tokens for r in sweep(t, do_bench)]
        lines += _table("act_stats_triton launch configurations, x 11008 bf16", ["tokens", "statistics", "config"],
                        rows)
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
