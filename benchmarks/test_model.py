"""Level "model": a whole LlavaForConditionalGeneration forward with statistics of every MLP (CLIP vision tower,
projector, Llama language model), random weights, built on the device.

GPU, full mode: the whole LLaVA-1.5-7B-width model (32 + 24 layers, 4096/11008 language, CLIP ViT-L/14-336, 576
image tokens), 32 batches of 8 samples per profiling pass over 4 data keys (8 token groups), against the plain
forward and the hand-written streaming hooks (the other hook peers would not fit or take minutes at this depth).
Elsewhere: the same widths with a reduced layer count, or on CPU quick mode widths / 8 (said in the table).
One profiling pass = ``batches_per_pass`` forwards (no KV cache, logits of the last position only) plus the final
reduction of the statistics; manu_fast's pass is one call of the public ``profile()``.
Targets (GPU): fused <= 1.05x plain and <= 0.8x hooks-stream; peak memory <= 1.02x plain.
"""
from __future__ import annotations

import pytest
import torch

from .harness import measure_peers
from .peers import assert_blocks_close, model_peers, model_peers_checked, tolerances
from .workloads import IMAGE_TOKEN, build_llava, dtype_name, llava_batches

# Differences between two forwards (HF act(g)*u vs the fused op) propagate through the layers in low precision.
DEPTH_SLACK = {torch.float32: 1.0, torch.bfloat16: 4.0}


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=dtype_name)
def test_model(results, device, sizes, dtype):
    if dtype not in sizes.model_dtypes:
        pytest.skip(f"{dtype_name(dtype)} not benchmarked on {device.type} in this mode")
    case = sizes.timed_model or sizes.model
    model = build_llava(case, device, dtype)
    batches = llava_batches(case, case.batches_per_pass, device, dtype)
    shapes = (f"{case.label}, {case.batches_per_pass}x[{case.batch}x({case.image_tokens} img+{case.text_tokens} txt)]")

    stats_peers = ("hooks-stream",) if sizes.timed_model is not None else None
    fns = {p.name: (lambda p=p: p.run(model, batches)) for p in model_peers(IMAGE_TOKEN, stats_peers=stats_peers)}
    runs, peaks, timings = measure_peers(fns, device, sizes.time_s, min_samples=3)
    rtol, active_rtol = (DEPTH_SLACK[dtype] * t for t in tolerances(dtype))
    fused = runs["fused"].blocks
    for name in model_peers_checked(runs):
        assert set(runs[name].blocks) == set(fused), f"{name} profiled other layers than fused"
        for layer, block in runs[name].blocks.items():
            assert_blocks_close(fused[layer], block, rtol, active_rtol, f"model {dtype_name(dtype)} {layer}: fused vs {name}")
    entries = [{"peer": name, "timing": timings[name], "peak_bytes": peaks[name], "held_bytes": runs[name].held_bytes,
                "shapes": shapes, "dtype": dtype_name(dtype)} for name in fns]
    if device.type == "cuda":  # the peak-memory target is relative to plain inference's own peak
        base = torch.cuda.memory_allocated(device)
        for e in entries:
            e["note"] = f"peak {(base + e['peak_bytes']) / (base + peaks['plain']):.3f}x plain's"
    ms = {e["peer"]: e["timing"].median_ms for e in entries}
    if "hooks-stream" in ms:
        entries[1]["note"] = (entries[1].get("note", "") + f"; fused/hooks-stream {ms['fused'] / ms['hooks-stream']:.2f}").lstrip("; ")
    results.report("model", case.label, f"Whole model profiling pass ({case.label}, {len(fused)} MLPs)", entries)
