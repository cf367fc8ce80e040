"""Level "op": the statistics op alone on (tokens, neurons) gate/up activations, SiLU, LLaVA-like token groups.

Peers: ``plain`` act(g)*u (no statistics: the lower bound), ``fused`` manu_fast.act_stats through the dispatch
(C++ on CPU, Triton on CUDA), ``reference`` manu_fast's float64 PyTorch reference op (the fallback), and the
statistics peers of benchmarks.peers fed with act(g)*u. Issue-4 target on CPU: fused >= 3x faster than the
reference and within 1.5x of plain act(g)*u (printed, not asserted: CI machines are noisy).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from manu_fast.ops import act_stats
from manu_fast.stats import empty_stats

from .harness import measure_peers
from .peers import GROUP_LABELS, IMAGE_GROUP, TEXT_GROUP, STATS_PEERS, assert_blocks_close, tolerances
from .workloads import dtype_name

G = len(GROUP_LABELS)


def llava_like_group_ids(tokens: int, device) -> torch.Tensor:
    """75 % image tokens, then text, the last 1/16 ignored (padding)."""
    gid = torch.full((tokens,), TEXT_GROUP, dtype=torch.int32)
    gid[: tokens * 3 // 4] = IMAGE_GROUP
    gid[tokens - tokens // 16:] = -1
    return gid.to(device)


def op_peers(g, u, gid) -> dict:
    """name -> fn; every fn but ``plain`` returns a fresh statistics block of act(g)*u."""
    n = g.shape[1]

    def fused_block(backend=None):
        acc = empty_stats(G, n, g.device)
        act_stats(g, u, act="silu", group_ids=gid, stats=acc, backend=backend)
        return acc

    def peer_block(name):
        s = STATS_PEERS[name](G, n, device=g.device)
        s.update(F.silu(g) * u, gid)
        return s.block()

    peers = {"plain": lambda: F.silu(g) * u, "fused": fused_block, "reference": lambda: fused_block("reference")}
    peers.update({name: (lambda name=name: peer_block(name)) for name in STATS_PEERS})
    return peers


def held_bytes(name: str, tokens: int, n: int, dtype: torch.dtype) -> int:
    """State each peer holds while the op runs: accumulators, or (hooks-store) the stored activation."""
    acc = empty_stats(G, n, "meta").nbytes
    return {"plain": 0, "fused": acc, "reference": acc, "hooks-stream": (4 * G * n + G) * 8,
            "welford": (3 * G * n + 4 * G * n) * 8, "hooks-store": tokens * n * dtype.itemsize + tokens * 4}[name]


@pytest.mark.parametrize("shape_index", [0, 1, 2])
def test_op(results, device, sizes, shape_index):
    if shape_index >= len(sizes.op_shapes):
        pytest.skip("shape not in this mode")
    tokens, n, dtype = sizes.op_shapes[shape_index]
    g = torch.randn(tokens, n, device=device).to(dtype)
    u = torch.randn(tokens, n, device=device).to(dtype)
    gid = llava_like_group_ids(tokens, device)
    blocks, peaks, timings = measure_peers(op_peers(g, u, gid), device, sizes.time_s)
    rtol, active_rtol = tolerances(dtype)
    for name in blocks:
        if name not in ("plain", "fused"):
            assert_blocks_close(blocks["fused"], blocks[name], rtol, active_rtol,
                                f"op {tokens}x{n} {dtype_name(dtype)}: fused vs {name}")
    entries = [{"peer": name, "timing": timings[name], "peak_bytes": peaks[name],
                "held_bytes": held_bytes(name, tokens, n, dtype), "shapes": f"{tokens}x{n}", "dtype": dtype_name(dtype)}
               for name in blocks]
    ms = {e["peer"]: e["timing"].median_ms for e in entries}
    entries[1]["note"] = (f"reference/fused {ms['reference'] / ms['fused']:.1f}x (target >= 3), "
                          f"fused/plain {ms['fused'] / ms['plain']:.2f}x (target <= 1.5)")
    results.report("op", f"silu-stats {tokens}x{n}", f"Op alone: act(g)*u + per-group statistics, {tokens} tokens x "
                   f"{n} neurons, {G} groups", entries)
