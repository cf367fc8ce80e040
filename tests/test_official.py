"""manu-official against an independent float64 implementation of its specification (docs/SELECTION.md,
"manu-official"), written here the way the official MANU code computes it: hooks that store every Linear output
of a batch under the code's hook names (as-run: every layer of a tower under the names of its last three layers;
per-layer: one name per layer), per-batch (L, D) statistics over the concatenated samples, chunks of 10 batches,
one top-k per tower over all names with ``scores >= threshold``, rows zeroed in the named layers. The weights the
two prune must be identical, bit for bit."""
import copy
import math

import pytest
import torch
import transformers as tf

from manu_fast.masks import Masks, apply_masks, compact_model, prune_weights, remove_masks
from manu_fast.official import OfficialStats, official_batches, official_prompt
from manu_fast.profiler import profile
from manu_fast.schema import StatsFileError
from manu_fast.select import select_neurons

IMAGE_TOKEN = 90


def tiny_llava(vision_layers=6, text_layers=6, seed=0):
    torch.manual_seed(seed)
    cfg = tf.LlavaConfig(
        vision_config=tf.CLIPVisionConfig(hidden_size=24, intermediate_size=36, num_hidden_layers=vision_layers,
                                          num_attention_heads=4, image_size=16, patch_size=4, projection_dim=16),
        text_config=tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=text_layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   pad_token_id=0),
        image_token_index=IMAGE_TOKEN, vision_feature_layer=-2, projector_hidden_act="gelu")
    return tf.LlavaForConditionalGeneration(cfg).eval()


def batches(n, multimodal, seed, batch=3):
    """n right-padded batches (the last one of 2 samples), of varying lengths: padding counts in the statistics."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        b = 2 if i == n - 1 else batch
        lengths = torch.randint(3, 9, (b,), generator=g)
        width = int(lengths.max()) + (16 if multimodal else 0) + int(torch.randint(0, 3, (), generator=g))
        ids = torch.zeros(b, width, dtype=torch.long)
        mask = torch.zeros(b, width, dtype=torch.long)
        for r, n_text in enumerate(lengths.tolist()):
            row = torch.randint(1, 89, (n_text,), generator=g)
            if multimodal:
                row = torch.cat([row[:1], torch.full((16,), IMAGE_TOKEN), row[1:]])
            ids[r, :row.numel()], mask[r, :row.numel()] = row, 1
        item = {"input_ids": ids, "attention_mask": mask}
        if multimodal:
            item["pixel_values"] = torch.randn(b, 3, 16, 16, generator=g)
        out.append(item)
    return out


def data(n=12):
    return {("forget", "multimodal"): batches(n, True, 1), ("forget", "text"): batches(n, False, 2),
            ("retain", "multimodal"): batches(n, True, 3), ("retain", "text"): batches(n, False, 4)}


# ------------------------------------------------------------------------------------ the independent reference
VISION_SITES, TEXT_SITES = ("fc1", "fc2"), ("gate_proj", "up_proj", "down_proj")


def reference_prune(model, data, variant, percent):
    """Prune ``model`` in place as the specification says; nothing from manu_fast is used."""
    towers = {"multimodal": (model.model.vision_tower.encoder.layers, VISION_SITES),
              "text": (model.model.language_model.layers, TEXT_SITES)}
    stored, handles = {}, []
    for modality, (layers, sites) in towers.items():
        last = range(len(layers) - 3, len(layers))
        for i, layer in enumerate(layers):
            for site in sites:
                for j in (last if variant == "as-run" else [i]):  # the hook names this layer's output is stored under
                    def hook(module, args, out, name=(modality, site, j)):
                        stored.setdefault(name, []).append(out.detach())
                    handles.append(getattr(layer.mlp, site).register_forward_hook(hook))
    final = {}
    with torch.no_grad():
        for (split, modality), items in data.items():
            rows, chunk_means = {}, {}
            for b, batch in enumerate(items):
                stored.clear()
                model(**batch)
                for name, outs in stored.items():
                    if name[0] != modality:
                        continue
                    x = torch.cat(outs, dim=0).double().clamp(min=-1e3, max=1e3)
                    for metric, value in (("abs", x.abs().mean(0)), ("freq", (x.abs() > 0.1).double().mean(0)),
                                          ("std", x.std(0)), ("rms", torch.sqrt((x ** 2).mean(0)))):
                        rows.setdefault((metric, name), []).append(value)
                if (b + 1) % 10 == 0 or b + 1 == len(items):
                    for key, value in rows.items():
                        chunk_means.setdefault(key, []).append(torch.cat(value).mean(0))
                    rows = {}
            for (metric, name), means in chunk_means.items():
                final[(split, metric, name)] = torch.stack(means).mean(0)
    for h in handles:
        h.remove()
    weights = {"abs": 2.0, "freq": 0.0, "std": 2.0, "rms": 2.0}
    for modality, (layers, _) in towers.items():
        names = [name for (split, metric, name) in final if split == "forget" and metric == "abs" and name[0] == modality]
        scores = {name: sum(w * (final[("forget", m, name)] / (final[("retain", m, name)] + 1e-5) - 1)
                            for m, w in weights.items()) for name in names}
        flat = torch.cat([s.flatten() for s in scores.values()])
        k = int((percent / 100) * flat.numel())
        threshold = torch.topk(flat, k).values[-1]
        with torch.no_grad():
            for (_, site, j), s in scores.items():
                linear = getattr(layers[j].mlp, site)
                drop = s >= threshold
                linear.weight[drop] = 0
                if linear.bias is not None:
                    linear.bias[drop] = 0


# ------------------------------------------------------------------------------------------------------ tests
def _ours(model, data, variant, percent, tmp_path=None):
    stats = profile(model, data, statistics="official", official_layers=variant, progress=False)
    if tmp_path is not None:  # through the files the CLI writes
        stats.save(tmp_path / "official.safetensors")
        stats = OfficialStats.load(tmp_path / "official.safetensors")
    masks = select_neurons(stats, "manu-official", alpha=percent)
    if tmp_path is not None:
        masks.save(tmp_path / "masks.safetensors")
        masks = Masks.load(tmp_path / "masks.safetensors")
    return stats, masks


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("variant", ["as-run", "per-layer"])
def test_zeroed_rows_equal_the_reference(variant, tmp_path):
    model, d, percent = tiny_llava(), data(), 10.0
    expected = copy.deepcopy(model)
    reference_prune(expected, d, variant, percent)
    stats, masks = _ours(copy.deepcopy(model), d, variant, percent, tmp_path)
    pruned = copy.deepcopy(model)
    prune_weights(pruned, masks)
    _assert_same_weights(pruned, expected)
    layers = {key.partition("::")[0] for key in masks.keep}
    towers = masks.by_tower()
    assert set(towers) == {"vision", "language"} and all(p > 0 for p, _ in towers.values())
    if variant == "as-run":  # the last three layers of each tower, the same rows in each
        assert layers == {f"model.vision_tower.encoder.layers.{i}.mlp" for i in (3, 4, 5)} | \
                         {f"model.language_model.layers.{i}.mlp" for i in (3, 4, 5)}
        for site in ("pre", "up", "out"):
            rows = [masks.keep[f"model.language_model.layers.{i}.mlp::{site}"] for i in (3, 4, 5)]
            assert torch.equal(rows[0], rows[1]) and torch.equal(rows[1], rows[2])
        # units are counted once per pruned layer: the three copies tie, so at least k units are pruned
        lang = masks.description["towers"]["language"]
        assert lang["units"] == 3 * (40 + 40 + 32) and lang["pruned"] >= lang["k"] == int(0.1 * lang["units"])
    else:
        assert len(layers) == 12
    assert stats.batches == {"forget/multimodal": 12, "forget/text": 12, "retain/multimodal": 12, "retain/text": 12}


def test_apply_masks_is_prune_weights_reversibly():
    model, d = tiny_llava(vision_layers=3, text_layers=3), data(4)
    _, masks = _ours(copy.deepcopy(model), d, "as-run", 20.0)
    pruned = copy.deepcopy(model)
    prune_weights(pruned, masks)
    masked = copy.deepcopy(model)
    apply_masks(masked, masks)
    batch = d[("forget", "multimodal")][0]
    with torch.no_grad():
        want = pruned(**batch).logits
        got = masked(**batch).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        remove_masks(masked)
        torch.testing.assert_close(masked(**batch).logits, model(**batch).logits, rtol=0, atol=0)
        apply_masks(masked, masks)  # compacting drops the hidden neurons and keeps the output-channel masks
        assert compact_model(masked) > 0
        torch.testing.assert_close(masked(**batch).logits, want, rtol=1e-5, atol=1e-5)


def test_k_zero_prunes_nothing_with_a_warning():
    model, d = tiny_llava(vision_layers=3, text_layers=3), data(2)
    stats = profile(model, d, statistics="official", progress=False)
    with pytest.warns(UserWarning, match="k = 0"):
        masks = select_neurons(stats, "manu-official", alpha=0.1)
    assert masks.num_pruned() == 0


def test_clear_errors():
    model, d = tiny_llava(vision_layers=2, text_layers=2), data(2)
    with pytest.raises(ValueError, match="apply to the exact statistics only"):
        profile(model, d, statistics="official", sites=("pre",), progress=False)
    with pytest.raises(ValueError, match="official_layers must be one of"):
        profile(model, d, statistics="official", official_layers="all", progress=False)
    one = {("forget", "text"): [{k: v[:1] for k, v in d[("forget", "text")][0].items()}]}
    with pytest.raises(ValueError, match="batches of >= 2"):
        profile(model, one, statistics="official", official_layers="per-layer", progress=False)
    stats = profile(model, {k: v for k, v in d.items() if k[0] == "forget"}, statistics="official", progress=False)
    with pytest.raises(ValueError, match="no retain data"):
        select_neurons(stats, "manu-official", alpha=10)
    exact = profile(model, d, progress=False)
    with pytest.raises(ValueError, match="manu-official selects from the official statistics"):
        select_neurons(exact, "manu-official", alpha=10)
    with pytest.raises(ValueError, match="one percentage"):
        select_neurons(stats, "manu-official", alpha={"language": 10})


def test_damaged_file_is_refused(tmp_path):
    model, d = tiny_llava(vision_layers=2, text_layers=2), data(2)
    path = tmp_path / "s.safetensors"
    profile(model, d, statistics="official", progress=False).save(path)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(StatsFileError, match="checksum"):
        OfficialStats.load(path)


def test_official_batches_and_prompts():
    items = list(range(25))
    forget = official_batches(items, 2, seed=0)
    assert len(forget) == math.ceil(25 / 2) == 13
    first_pass = sum(forget[:10], [])
    assert len(set(first_pass)) == 20  # one shuffle per chunk: the first ten batches are disjoint
    assert official_batches(items, 2, limit=4, seed=0) == forget[:4]
    assert official_prompt("Q?", "A.", True) == "USER: <image>\nQ?\nASSISTANT: A."
    assert official_prompt("Q?", "A.", False) == "USER:Q?\nASSISTANT: A."


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["as-run", "per-layer"])
def test_zeroed_rows_equal_the_reference_at_llava_depth(variant):
    """LLaVA-1.5's depth (24 CLIP + 32 Llama layers): as-run prunes vision 21-23 and language 29-31."""
    model, d, percent = tiny_llava(24, 32), data(11), 2.0
    expected = copy.deepcopy(model)
    reference_prune(expected, d, variant, percent)
    _, masks = _ours(copy.deepcopy(model), d, variant, percent)
    pruned = copy.deepcopy(model)
    prune_weights(pruned, masks)
    _assert_same_weights(pruned, expected)
    if variant == "as-run":
        assert {int(k.split(".layers.")[1].split(".")[0]) for k in masks.keep} == {21, 22, 23, 29, 30, 31}


# ------------------------------------------------------------------------------------------------------- CLI
def test_cli_profile_official_select_report_prune(tmp_path, capsys):
    import bench_files as bf
    from manu_fast.cli import main
    files = bf.write_all(tmp_path)["mllmu"]
    stats, masks, out = tmp_path / "o.safetensors", tmp_path / "m.safetensors", tmp_path / "pruned"

    def cli(*argv):
        capsys.readouterr()
        rc = main([str(a) for a in argv])
        text, err = capsys.readouterr()
        assert rc == 0, err
        return text

    common = ["--forget", files["forget_5"], "--retain", files["retain_95"], "--qa", files["ft_Data"], "--names",
              files["names"], "--no-progress", "--seed", 3]
    capsys.readouterr()  # 3 retain text-only items in batches of 2: a batch of one, whose std over samples is NaN
    assert main([str(a) for a in ["profile", tmp_path / "model", stats, *common, "--batch-size", 2, "--official",
                                  "--official-layers", "per-layer"]]) == 2
    assert "a retain/text batch would hold one item (3 items in batches of 2)" in capsys.readouterr().err
    assert "official statistics (per-layer)" in cli("profile", tmp_path / "model", stats, *common, "--batch-size", 4,
                                                    "--official", "--official-layers", "per-layer")
    report = cli("report", stats)
    assert "official MANU statistics (per-layer)" in report and "pre, up, out" in report
    assert main(["report", str(stats), "--plot", str(tmp_path / "o.png")]) == 2  # was ignored without a word
    assert "plot the masks" in capsys.readouterr().err and not (tmp_path / "o.png").exists()
    cli("select", stats, masks, "--strategy", "manu-official", "--alpha", 10)
    assert Masks.load(masks).site == "linear" and Masks.load(masks).num_pruned() > 0
    cli("prune", tmp_path / "model", masks, out)
    pruned = tf.LlavaForConditionalGeneration.from_pretrained(out)
    zero_rows = (pruned.model.language_model.layers[1].mlp.down_proj.weight == 0).all(1)
    assert torch.equal(zero_rows, ~Masks.load(masks).keep["model.language_model.layers.1.mlp::out"])
    capsys.readouterr()
    assert main(["select", str(stats), str(masks), "--strategy", "manu-official", "--per-layer"]) == 2
    assert "do not apply" in capsys.readouterr().err
    assert main(["profile", str(tmp_path / "model"), str(stats), "--synthetic", "--official"]) == 2
    assert main(["profile", str(tmp_path / "model"), str(stats), *map(str, common), "--official", "--sites", "pre"]) == 2
    assert "apply to the exact statistics only" in capsys.readouterr().err


def test_demo_official_inputs_and_options():
    from manu_fast import demo
    inputs = {("forget", "text"): ["f1", "f2"], ("retain", "text"): [f"r{i}" for i in range(9)],
              ("forget", "multimodal"): ["F1"], ("retain", "multimodal"): ["R1", "R2", "R3"]}
    chosen = demo.official_inputs(inputs, seed=0)
    assert chosen[("forget", "text")] == ["f1", "f2"] and len(chosen[("retain", "text")]) == 2
    assert set(chosen[("retain", "text")]) <= set(inputs[("retain", "text")]) and len(chosen[("retain", "multimodal")]) == 1
    assert chosen == demo.official_inputs(inputs, seed=0) and chosen != demo.official_inputs(inputs, seed=1)
    with pytest.raises(ValueError, match="official code's selection"):
        demo.check_experiment(demo.ExperimentConfig(calibrated=("manu-official",)))
