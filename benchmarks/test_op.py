"""Level "op": the statistics op alone on (tokens, neurons) gate/up activations, SiLU, LLaVA-like token groups.

Peers: ``plain`` act(g)*u (no statistics: the lower bound), ``fused`` manu_fast.act_stats through the dispatch
(C++ on CPU, Triton on CUDA), ``fused-3-sites`` the same with statistics of pre and up too, ``reference``
manu_fast's float64 PyTorch reference op (the fallback), and the statistics peers of benchmarks.peers fed with
act(g)*u (hooks-compiled and hooks-compiled-masked: under torch.compile; their first, untimed call compiles). Accumulators of G = 2 and 8 token groups; the tokens of one call belong to one data key (image, then
text, then padding), as in a profiling batch. Targets: CPU fused >= 3x faster than the reference and <= 1.5x
plain; GPU (bf16) fused <= 1.3x plain, fused-3-sites <= 1.6x (printed, not asserted: machines are noisy).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from manu_fast.ops import act_stats
from manu_fast.stats import empty_stats

from .harness import measure_peers
from .peers import STATS_PEERS, assert_blocks_close, llava_like_group_ids, tolerances
from .workloads import dtype_name


def op_peers(g, u, gid, num_groups: int) -> dict:
    """name -> fn; every fn but ``plain`` returns a fresh statistics block of act(g)*u."""
    n = g.shape[1]

    def fused_block(backend=None, sites=1):
        accs = [empty_stats(num_groups, n, g.device) for _ in range(sites)]
        act_stats(g, u, act="silu", group_ids=gid, stats=accs[0], pre_stats=accs[1] if sites > 1 else None,
                  up_stats=accs[2] if sites > 2 else None, backend=backend)
        return accs[0]

    def peer_block(name):
        s = STATS_PEERS[name](num_groups, n, device=g.device)
        s.update(F.silu(g) * u, gid)
        return s.block()

    peers = {"plain": lambda: F.silu(g) * u, "fused": fused_block, "fused-3-sites": lambda: fused_block(sites=3),
             "reference": lambda: fused_block("reference")}
    peers.update({name: (lambda name=name: peer_block(name)) for name in STATS_PEERS})
    return peers


def held_bytes(name: str, tokens: int, n: int, dtype: torch.dtype, num_groups: int) -> int:
    """State each peer holds while the op runs: accumulators, or (hooks-store) the stored activation."""
    acc = empty_stats(num_groups, n, "meta").nbytes
    return {"plain": 0, "fused": acc, "fused-3-sites": 3 * acc, "reference": acc,
            "hooks-stream": (4 * num_groups * n + num_groups) * 8, "hooks-compiled": (4 * num_groups * n + num_groups) * 8,
            "hooks-compiled-masked": (4 * num_groups * n + num_groups) * 8, "welford": 7 * num_groups * n * 8,
            "hooks-store": tokens * n * dtype.itemsize + tokens * 4}[name]


@pytest.mark.parametrize("num_groups", [2, 8], ids=lambda g: f"G{g}")
@pytest.mark.parametrize("shape_index", [0, 1, 2])
def test_op(results, device, sizes, shape_index, num_groups):
    if shape_index >= len(sizes.op_shapes) or num_groups not in sizes.op_groups:
        pytest.skip("shape not in this mode")
    tokens, n, dtype = sizes.op_shapes[shape_index]
    G = num_groups
    g = torch.randn(tokens, n, device=device).to(dtype)
    u = torch.randn(tokens, n, device=device).to(dtype)
    gid = llava_like_group_ids(tokens, G, device)
    blocks, peaks, timings = measure_peers(op_peers(g, u, gid, G), device, sizes.time_s)
    rtol, active_rtol = tolerances(dtype)
    for name in blocks:
        if name not in ("plain", "fused"):
            assert_blocks_close(blocks["fused"], blocks[name], rtol, active_rtol,
                                f"op {tokens}x{n} {dtype_name(dtype)}: fused vs {name}")
    entries = [{"peer": name, "timing": timings[name], "peak_bytes": peaks[name],
                "held_bytes": held_bytes(name, tokens, n, dtype, G), "shapes": f"{tokens}x{n}", "dtype": dtype_name(dtype)}
               for name in blocks]
    ms = {e["peer"]: e["timing"].median_ms for e in entries}
    entries[1]["note"] = (f"reference/fused {ms['reference'] / ms['fused']:.1f}x (target >= 3), "
                          f"fused/plain {ms['fused'] / ms['plain']:.2f}x (target <= "
                          f"{1.3 if device.type == 'cuda' else 1.5})")
    results.report("op", f"silu-stats {tokens}x{n} G{G}", f"Op alone: act(g)*u + per-group statistics, {tokens} "
                   f"tokens x {n} neurons, {G} groups", entries)
