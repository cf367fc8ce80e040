"""Kernel-level timing on CUDA: the profiling gated MLP against the plain HF-style MLP.

    python benchmarks/gated_paths.py [--tokens 4096 16384] [--out results.md]

Shapes default to LLaVA-1.5-7B's language model (hidden 4096, intermediate 11008, bf16, SiLU). Providers:
``plain`` = down(act(gate(x)) * up(x)) as HF runs it (no statistics: the lower bound); ``unfused`` =
cuBLAS gate/up + the Triton act_stats kernel (stats of h over 4 groups) + down; ``fused`` = the fused gate/up
GEMM kernel + down; ``auto`` = what ``gated_linear_act_stats`` picks for the shape. Also the elementwise part
alone (act*up vs act_stats). Medians of ``triton.testing.do_bench`` (warm-up excluded), peak extra memory.
Prints a markdown table with the device name and versions; without CUDA it says so and exits 0.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

NUM_GROUPS = 4
PATH_ENV = "MANU_FAST_GATED_PATH"


def _timed(fn, do_bench):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ms = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    return ms, (torch.cuda.max_memory_allocated() - base) / 2**20


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


def bench(tokens: int, hidden: int, inter: int, dtype: torch.dtype):
    from triton.testing import do_bench

    from manu_fast.activations import ACTIVATIONS
    from manu_fast.ops import act_stats, gated_linear_act_stats
    from manu_fast.stats import empty_stats

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(tokens, hidden, device=dev, dtype=dtype, generator=g)
    w_gate, w_up = (torch.randn(inter, hidden, device=dev, dtype=dtype, generator=g) / hidden ** 0.5 for _ in range(2))
    w_down = torch.randn(hidden, inter, device=dev, dtype=dtype, generator=g) / inter ** 0.5
    gid = torch.randint(-1, NUM_GROUPS, (tokens,), device=dev, dtype=torch.int32, generator=g)
    acc = empty_stats(NUM_GROUPS, inter, dev)
    silu = ACTIVATIONS["silu"]

    def plain():
        return F.linear(silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)

    def profiling():
        h = gated_linear_act_stats(x, w_gate, None, w_up, None, act="silu", group_ids=gid, stats=acc, backend="triton")
        return F.linear(h, w_down)

    gate, up = F.linear(x, w_gate), F.linear(x, w_up)
    rows = []
    plain_ms, plain_mem = _timed(plain, do_bench)
    rows.append(("mlp", "plain (HF, no stats)", plain_ms, plain_mem, 1.0))
    for name in ("unfused", "fused", "auto"):
        ms, mem = _timed(_with_path(name, profiling), do_bench)
        rows.append(("mlp", f"profiling {name}", ms, mem, ms[0] / plain_ms[0]))
    ew_ms, ew_mem = _timed(lambda: silu(gate) * up, do_bench)
    rows.append(("act*up", "plain (HF, no stats)", ew_ms, ew_mem, 1.0))
    ms, mem = _timed(lambda: act_stats(gate, up, act="silu", group_ids=gid, stats=acc, backend="triton"), do_bench)
    rows.append(("act*up", "act_stats (Triton)", ms, mem, ms[0] / ew_ms[0]))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--out", help="also write the markdown table to this file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gated_paths: no CUDA device, nothing measured")
        return 0
    import triton
    header = (f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
              f"hidden {args.hidden}, intermediate {args.intermediate}, bf16, SiLU, {NUM_GROUPS} groups")
    lines = [header, "", "| tokens | part | provider | median ms | p20 ms | p80 ms | peak extra MiB | x plain |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for t in args.tokens:
        for part, name, (med, p20, p80), mem, ratio in bench(t, args.hidden, args.intermediate, torch.bfloat16):
            lines.append(f"| {t} | {part} | {name} | {med:.3f} | {p20:.3f} | {p80:.3f} | {mem:.0f} | {ratio:.3f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
