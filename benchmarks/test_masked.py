"""Level "masked": inference with pruned neurons. The dense HF MLP (``plain``) against manu_fast's reversible
mask on the fused layer (``fused-mask``: the full-size matmuls, the mask applied inside the fused activation) and
the compacted layer (``compact``: ``layer.compact()`` drops the pruned neurons from the weights).
Target: compact time <= (1 - pruned fraction) x dense + 5 % (compact widths: docs/OPS.md, section 5).
"""
from __future__ import annotations

import pytest
import torch

from manu_fast.layers import FusedGatedMLP

from .harness import measure_peers
from .workloads import build_mlp, dtype_name

# Relative error allowed between two ways of computing the same masked MLP output (different summation orders,
# and in bf16 the HF path rounds act(g) and act(g)*u separately).
OUTPUT_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).norm() / ref.double().norm())


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=dtype_name)
def test_masked_inference(results, device, sizes, dtype):
    if dtype not in sizes.masked_dtypes:
        pytest.skip(f"{dtype_name(dtype)} not benchmarked on {device.type} in this mode")
    mlp = build_mlp("llava-lm-mlp", device, dtype)
    n, hidden = mlp.down_proj.in_features, mlp.down_proj.out_features
    x = torch.randn(sizes.masked_tokens, hidden, device=device).to(dtype)
    shapes = f"{sizes.masked_tokens}x{hidden}->{n}"

    def forward(module):
        def call():
            with torch.no_grad():
                return module(x)
        return call

    gen = torch.Generator().manual_seed(0)
    for frac in sizes.prune_fractions:
        keep = torch.ones(n, dtype=torch.bool)
        keep[torch.randperm(n, generator=gen)[: round(frac * n)]] = False
        keep = keep.to(device)
        layer = FusedGatedMLP(mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn)
        layer.set_mask("bench", keep)
        fns = {"plain": forward(mlp), "fused-mask": forward(layer), "compact": forward(layer.compact())}
        outs, peaks, timings = measure_peers(fns, device, sizes.time_s)
        with torch.no_grad():
            h = mlp.act_fn(mlp.gate_proj(x).float()) * mlp.up_proj(x).float()
            ref = torch.nn.functional.linear((h * keep).to(dtype), mlp.down_proj.weight)
        for name in ("fused-mask", "compact"):
            err = relative_error(outs[name], ref)
            assert err <= OUTPUT_RTOL[dtype], f"{name} at {frac:.0%} pruned: relative error {err:.2e}"
        ratio = timings["compact"].median_ms / timings["plain"].median_ms
        notes = {"plain": "dense HF LlamaMLP", "compact": f"compact/plain {ratio:.2f} (target <= {1 - frac + 0.05:.2f})"}
        entries = [{"peer": name, "timing": timings[name], "peak_bytes": peaks[name], "note": notes.get(name, ""),
                    "shapes": shapes, "dtype": dtype_name(dtype), "pruned": f"{frac:.0%}"} for name in fns]
        results.report("masked", f"pruned {frac:.0%}", f"Masked inference, LLaVA language MLP, {frac:.0%} of neurons "
                       "pruned", entries, columns=("pruned",))
