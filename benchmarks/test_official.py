"""Level "official": a profiling pass with the official MANU code's statistics (docs/SELECTION.md, manu-official).

Peers: ``plain`` (the forwards alone); ``official as-run`` / ``official per-layer``, manu_fast's
``profile(..., statistics="official")``, which merges each hooked Linear output into one batch's per-position sums as
it is produced (O(L x D) per (tower, site) as-run, per call per layer) and keeps O(D) per unit between batches;
``official store-all``, the official code's own way: every hooked output of the batch stored under its hook names
(as run: every layer under the names of the tower's last three, so three copies), concatenated and reduced when the
batch ends, in float32. The data: the model level's LLaVA, multimodal and text-only batches of forget and retain.
``held`` is the most a peer holds at once within a batch: store-all's stored outputs, counted from its tensors;
manu_fast's per-position sums (5 float64 (L, D) tensors per as-run (tower, site), counted from the shapes).
"""
from __future__ import annotations

import torch

from manu_fast.official import CHUNK, CLAMP, LAST_LAYERS, METRIC_ORDER, TAU, TOWER_MODALITY
from manu_fast.profiler import profile

from .harness import measure_peers
from .workloads import IMAGE_TOKEN, build_llava, dtype_name, llava_batches

SITES = {"vision": ("fc1", "fc2"), "language": ("gate_proj", "up_proj", "down_proj")}
OUR_SITE = {"fc1": "pre", "fc2": "out", "gate_proj": "pre", "up_proj": "up", "down_proj": "out"}


def official_data(case, device, dtype) -> dict:
    """{(split, modality): model kwargs}: forget and retain, each ``case.batches_per_pass // 2`` multimodal batches
    and the same batches text-only (the image placeholders replaced by a text token, no pixels)."""
    n = max(1, case.batches_per_pass // 2)
    mm = [b.kwargs for b in llava_batches(case, 2 * n, device, dtype)]
    text = [{"input_ids": torch.where(k["input_ids"] == IMAGE_TOKEN, 3, k["input_ids"]),
             "attention_mask": k["attention_mask"]} for k in mm]
    return {("forget", "multimodal"): mm[:n], ("forget", "text"): text[:n],
            ("retain", "multimodal"): mm[n:], ("retain", "text"): text[n:]}


def _towers(model):
    return {"vision": model.model.vision_tower.encoder.layers, "language": model.model.language_model.layers}


def store_all(model, data) -> tuple[dict, int]:
    """The official code's collection, as run: {(split, site, metric): (D,) float32}, and the most bytes it stored
    within one batch."""
    stored, handles = {}, []
    for tower, layers in _towers(model).items():
        for layer in layers:
            for site in SITES[tower]:
                for j in range(len(layers) - LAST_LAYERS, len(layers)):
                    def hook(module, args, out, name=(tower, site, j)):
                        stored.setdefault(name, []).append(out.detach())
                    handles.append(getattr(layer.mlp, site).register_forward_hook(hook))
    final, most = {}, 0
    try:
        with torch.no_grad():
            for (split, modality), batches in data.items():
                rows, means = {}, {}
                for b, kwargs in enumerate(batches):
                    stored.clear()
                    model(**kwargs, use_cache=False, logits_to_keep=1)
                    most = max(most, sum(t.numel() * t.element_size() for outs in stored.values() for t in outs))
                    for (tower, site, j), outs in stored.items():
                        if TOWER_MODALITY[tower] != modality:
                            continue
                        x = torch.cat(outs).float().clamp(-CLAMP, CLAMP)
                        for metric, v in zip(METRIC_ORDER, (x.abs().mean(0), (x.abs() > TAU).float().mean(0),
                                                            x.std(0), (x ** 2).mean(0).sqrt())):
                            rows.setdefault((tower, site, j, metric), []).append(v)
                    if (b + 1) % CHUNK == 0 or b + 1 == len(batches):
                        for key, v in rows.items():
                            means.setdefault(key, []).append(torch.cat(v).mean(0))
                        rows = {}
                for (tower, site, j, metric), v in means.items():
                    final[(split, f"{tower}::{site}", metric)] = torch.stack(v).mean(0)
    finally:
        for h in handles:
            h.remove()
    return final, most


def _ours_held(model, data) -> int:
    """Bytes of manu_fast's per-position sums within one batch, as run (5 float64 (L, D) per (tower, site))."""
    kw = data[("forget", "multimodal")][0]
    vision_positions = (kw["pixel_values"].shape[-1] // model.config.vision_config.patch_size) ** 2 + 1
    lengths = {"vision": vision_positions, "language": kw["input_ids"].shape[1]}
    return sum(5 * 8 * lengths[t] * getattr(layers[0].mlp, s).out_features
               for t, layers in _towers(model).items() for s in SITES[t])


def test_official_statistics(results, device, sizes):
    case, dtype = sizes.model, sizes.model_dtypes[0]
    model = build_llava(case, device, dtype)
    data = official_data(case, device, dtype)

    def plain():
        with torch.no_grad():
            for batches in data.values():
                for kwargs in batches:
                    model(**kwargs, use_cache=False, logits_to_keep=1)

    fns = {"plain": plain, "official as-run": lambda: profile(model, data, statistics="official", progress=False),
           "official per-layer": lambda: profile(model, data, statistics="official", official_layers="per-layer",
                                                 progress=False),
           "official store-all": lambda: store_all(model, data)}
    runs, peaks, timings = measure_peers(fns, device, sizes.time_s, min_samples=2)
    ours, (theirs, stored) = runs["official as-run"], runs["official store-all"]
    for tower, layers in _towers(model).items():
        for site in SITES[tower]:
            for split in ("forget", "retain"):
                for metric in METRIC_ORDER:
                    want = theirs[(split, f"{tower}::{site}", metric)].double().cpu()
                    got = ours.metric(split, tower, OUR_SITE[site], metric)
                    torch.testing.assert_close(got, want, rtol=2e-3, atol=1e-5, msg=f"{tower} {site} {metric}")
    held = {"official as-run": _ours_held(model, data), "official store-all": stored}
    n = len(data[("forget", "multimodal")])
    shapes = f"{case.label}, 4x{n}x[{case.batch}x({case.image_tokens} img+{case.text_tokens} txt)]"
    entries = [{"peer": name, "timing": timings[name], "peak_bytes": peaks[name], "held_bytes": held.get(name),
                "shapes": shapes, "dtype": dtype_name(dtype)} for name in fns]
    results.report("official", case.label, f"Official MANU statistics, one profiling pass ({case.label})", entries)
