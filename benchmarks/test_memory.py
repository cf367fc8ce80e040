"""Level "memory": extra memory while profiling a whole LLaVA, per peer, as the number of profiled tokens grows.

``held`` is the statistics state a peer holds at the end of a pass (accumulators, or every stored activation for
hooks-store), counted exactly from its tensors; ``peak extra`` is measured (CUDA: max_memory_allocated; CPU: peak
RSS growth, a lower bound). manu_fast's fused statistics are O(neurons) per layer, independent of tokens; the
MANU reference style (hooks-store) is O(tokens x neurons). On CUDA, hooks-store is also run until it runs out of
memory (with MANU_FAST_BENCH_OOM=1: it takes minutes), and the point where it does is recorded.
"""
from __future__ import annotations

import gc
import math
import os

import torch

from .harness import available_bytes, fmt_bytes, run_with_peak
from .peers import STATS_PEERS, HookPeer, model_peers
from .workloads import IMAGE_TOKEN, build_llava, dtype_name, llava_batches

# LLaVA-1.5-7B: 32 Llama layers (11008 neurons), 24 CLIP ViT-L layers (4096 neurons, 577 tokens), projector 4096.
REAL_7B = dict(lm_layers=32, lm_neurons=11008, vision_layers=24, vision_neurons=4096, projector_neurons=4096,
               image_tokens=576)


def store_bytes_per_sample(lm_layers, lm_neurons, vision_layers, vision_neurons, projector_neurons, image_tokens,
                           text_tokens, itemsize) -> int:
    """Bytes the store-everything hooks hold per sample (one image + text): every MLP's hidden activation for every
    token of its tower, plus one int32 group id per token and layer."""
    lm_tokens, vision_tokens = image_tokens + text_tokens, image_tokens + 1  # CLIP adds a CLS token
    per = lambda layers, neurons, tokens: layers * tokens * (neurons * itemsize + 4)  # noqa: E731
    return (per(lm_layers, lm_neurons, lm_tokens) + per(vision_layers, vision_neurons, vision_tokens)
            + per(1, projector_neurons, image_tokens))


def test_memory_growth(results, device, sizes):
    case = sizes.model
    dtype = sizes.model_dtypes[0]
    model = build_llava(case, device, dtype)
    peers = model_peers(IMAGE_TOKEN)
    per_sample = store_bytes_per_sample(case.text_layers, case.lm["intermediate_size"], case.vision_layers,
                                        case.vit["intermediate_size"], case.lm["hidden_size"], case.image_tokens,
                                        case.text_tokens, dtype.itemsize)
    held = {}
    for passes in sizes.memory_passes:
        batches = llava_batches(case, passes, device, dtype)
        tokens = sum(b.lm_tokens for b in batches)
        entries = []
        for p in peers:
            run, peak = run_with_peak(lambda p=p: p.run(model, batches), device)
            held[p.name, passes] = run.held_bytes
            entries.append({"peer": p.name, "held_bytes": run.held_bytes, "peak_bytes": peak,
                            "shapes": f"{passes} batches, {tokens} LM tokens", "dtype": dtype_name(dtype)})
            del run
            gc.collect()
        samples = passes * case.batch
        assert held["hooks-store", passes] == samples * per_sample, "hooks-store holds other than every activation"
        results.report("memory", f"{case.label}, {passes} batches",
                       f"Memory while profiling ({case.label}, {tokens} LM tokens in {passes} batches)", entries)
    first, last = sizes.memory_passes[0], sizes.memory_passes[-1]
    for name in ("fused", *(n for n in STATS_PEERS if n != "hooks-store")):
        assert held[name, first] == held[name, last], f"{name} state grows with tokens"

    real = store_bytes_per_sample(**REAL_7B, text_tokens=case.text_tokens, itemsize=2)
    free = available_bytes(device)
    print(f"\nhooks-store on the real LLaVA-1.5-7B (bf16/fp16, 32+24 layers): {fmt_bytes(real)} per sample "
          f"({REAL_7B['image_tokens']} image + {case.text_tokens} text tokens); fused: "
          f"{fmt_bytes(7 * 2 * 8 * (32 * 11008 + 24 * 4096 + 4096))} in all for 2 groups (7 float64 fields). "
          f"With {fmt_bytes(free)} free here, hooks-store fills it after ~{free // real} samples.")
    if device.type == "cuda" and os.environ.get("MANU_FAST_BENCH_OOM") == "1":  # minutes; measured once (BENCHMARKS.md)
        _store_until_oom(results, model, case, dtype, per_sample, device)


def _store_until_oom(results, model, case, dtype, per_sample, device):
    """Run hooks-store over more and more batches until CUDA runs out of memory; record where it did."""
    batch = llava_batches(case, 1, device, dtype)[0]
    predicted = available_bytes(device) // (per_sample * case.batch)
    count = max(2, math.ceil(1.25 * predicted))
    peer = HookPeer("hooks-store", IMAGE_TOKEN)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        run = peer.run(model, [batch] * count)
        note, held = f"no OOM after {count} batches", run.held_bytes
        del run
    except RuntimeError as e:  # torch.cuda.OutOfMemoryError, or cuBLAS failing to allocate its workspace
        if not isinstance(e, torch.cuda.OutOfMemoryError) and "ALLOC" not in str(e) and "out of memory" not in str(e):
            raise
        note, held = f"OOM (predicted after ~{predicted} of {count} batches): {type(e).__name__}", None
    peak = torch.cuda.max_memory_allocated(device)
    gc.collect()
    torch.cuda.empty_cache()
    results.report("memory", f"{case.label}, until OOM", f"hooks-store until out of memory ({case.label})",
                   [{"peer": "hooks-store", "held_bytes": held, "peak_bytes": peak, "note": note,
                     "shapes": f"up to {count} batches x {case.batch} samples", "dtype": dtype_name(dtype)}])
