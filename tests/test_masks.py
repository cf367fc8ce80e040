"""Masks: container, safetensors file, reversible masks, permanent pruning that survives save/from_pretrained."""
import copy

import torch
import transformers as tf
import pytest

from manu_fast.adapters import find_mlps, fingerprint, get_patch
from manu_fast.masks import Masks, apply_masks, prune_weights, remove_masks
from manu_fast.stats import StatsFileError

from tiny_models import build, inputs

LAYER = "model.layers.0.mlp"


def llama():
    return build("llama")


def random_masks(model, fraction=0.3, site="hidden", seed=0) -> Masks:
    fp = fingerprint(model)
    g = torch.Generator().manual_seed(seed)
    base = Masks.all_kept(fp, site)
    keep = {n: torch.rand(k.numel(), generator=g) >= fraction for n, k in base.keep.items()}
    return Masks(keep, fp, site, {"strategy": "test"})


def logits(model, x):
    with torch.no_grad():
        return model(**x).logits


def test_counts_fraction_combine():
    fp = fingerprint(llama())
    a = Masks.all_kept(fp)
    a.keep[LAYER][[1, 2]] = False
    b = Masks.all_kept(fp, layers=[LAYER])
    b.keep[LAYER][[2, 5]] = False
    c = a & b
    assert c.pruned_indices(LAYER).tolist() == [1, 2, 5]
    assert c.num_pruned() == 3 and c.num_total() == 2 * 40 and c.fraction() == pytest.approx(3 / 80)
    assert c.by_tower() == {"language": (3, 80)}
    with pytest.raises(ValueError, match="site"):
        a.combine(Masks.all_kept(fp, "out"))
    with pytest.raises(ValueError, match="shape \\(40,\\)"):
        Masks({LAYER: torch.ones(39, dtype=torch.bool)}, fp)
    with pytest.raises(ValueError, match="fingerprint does not have"):
        Masks({"model.nope": torch.ones(40, dtype=torch.bool)}, fp)


def test_save_load_and_refusals(tmp_path):
    model = llama()
    m = random_masks(model)
    path = tmp_path / "m.safetensors"
    m.save(path)
    back = Masks.load(path, expect_fingerprint=fingerprint(model))
    assert back.site == m.site and back.description == m.description and back.fingerprint == m.fingerprint
    assert all(torch.equal(back.keep[n], m.keep[n]) for n in m.keep)
    other = build("llava")
    with pytest.raises(StatsFileError, match="made for a 'llama' model"):
        Masks.load(path, expect_fingerprint=fingerprint(other))
    # a file whose tensors disagree with its own fingerprint (wrong length)
    from manu_fast.io import save_tensors
    meta = {"format": "manu_fast.masks/1", "site": "hidden", "fingerprint": '{"layers": {"%s": {"kind": "gated", '
            '"tower": "language", "neurons": 40, "hidden": 32}}, "model_type": "llama"}' % LAYER}
    save_tensors({LAYER: torch.ones(41, dtype=torch.bool)}, tmp_path / "bad.safetensors", meta)
    with pytest.raises(StatsFileError, match="shape \\(40,\\)"):
        Masks.load(tmp_path / "bad.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(StatsFileError):
        Masks.load(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError):
        Masks.load(tmp_path / "missing.safetensors")


def test_apply_remove_compose_reversible():
    model = llama()
    x = inputs("llama", model)
    dense = logits(model, x)
    a, b = random_masks(model, seed=1), random_masks(model, seed=2)
    apply_masks(model, a, "a")
    out_a = logits(model, x)
    apply_masks(model, b, "b")
    layer = get_patch(model).layers[LAYER]
    assert torch.equal(layer.keep, a.keep[LAYER] & b.keep[LAYER])
    out_ab = logits(model, x)
    remove_masks(model, "b")
    torch.testing.assert_close(logits(model, x), out_a, rtol=0, atol=0)
    remove_masks(model, "a")
    torch.testing.assert_close(logits(model, x), dense, rtol=1e-5, atol=1e-5)
    assert (out_a - dense).abs().max() > 1e-3 and (out_ab - out_a).abs().max() > 1e-3
    with pytest.raises(ValueError, match="no mask named 'a'"):
        remove_masks(model, "a")
    out = random_masks(model, site="out")  # output channels: zeroed after down_proj, as prune_weights zeroes its rows
    pruned = copy.deepcopy(model)
    prune_weights(pruned, out)
    apply_masks(model, out, "out")
    torch.testing.assert_close(logits(model, x), logits(pruned, x), rtol=1e-5, atol=1e-5)
    remove_masks(model, "out")
    torch.testing.assert_close(logits(model, x), dense, rtol=1e-5, atol=1e-5)
    with pytest.raises(StatsFileError):
        apply_masks(model, random_masks(build("qwen2")))


def test_prune_weights_matches_mask_and_round_trips_stock_transformers(tmp_path):
    model = build("llava")
    x = inputs("llava", model)
    m = random_masks(model, 0.25)
    assert {t for t, (p, _) in m.by_tower().items() if p} == {"vision", "projector", "language"}
    mlps = find_mlps(model)
    before = {(i.name, lin, p): t.detach().clone() for i in mlps for lin in i.linears
              for p, t in getattr(i.module, lin).named_parameters()}
    apply_masks(model, m)
    masked = logits(model, x)
    get_patch(model).unpatch()
    prune_weights(model, m)
    assert get_patch(model) is None  # a stock model stays stock
    torch.testing.assert_close(logits(model, x), masked, rtol=1e-5, atol=1e-5)
    # only the pruned neurons' rows (gate/up/fc1 + bias) and columns (down/fc2) changed, and they are zero
    for i in mlps:  # the last Linear (down_proj / fc2) reads the neurons as input columns
        idx = m.pruned_indices(i.name)
        for lin in i.linears:
            for p, t in getattr(i.module, lin).named_parameters():
                expect = before[(i.name, lin, p)].clone()
                if lin != i.linears[-1]:
                    expect[idx] = 0
                elif p == "weight":
                    expect[:, idx] = 0
                assert torch.equal(t, expect), (i.name, lin, p)
    model.save_pretrained(tmp_path / "pruned")
    reloaded = tf.LlavaForConditionalGeneration.from_pretrained(tmp_path / "pruned").eval()
    torch.testing.assert_close(logits(reloaded, x), masked, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("site", ["pre", "up"])
def test_linear_output_sites_zero_rows_and_equal_hidden_mask(site):
    model = llama()
    x = inputs("llama", model)
    m = random_masks(model, site=site)
    apply_masks(model, m)  # act(0) = 0: zeroing gate/up outputs zeroes h
    masked = logits(model, x)
    get_patch(model).unpatch()
    prune_weights(model, m)
    torch.testing.assert_close(logits(model, x), masked, rtol=1e-5, atol=1e-5)
    mlp = model.get_submodule(LAYER)
    lin = mlp.gate_proj if site == "pre" else mlp.up_proj
    assert torch.equal(lin.weight[m.pruned_indices(LAYER)], torch.zeros_like(lin.weight[m.pruned_indices(LAYER)]))


def test_out_site_zeroes_mlp_output_rows():
    model = llama()
    m = random_masks(model, site="out")
    prune_weights(model, m)
    captured = {}
    model.get_submodule(LAYER).register_forward_hook(lambda mod, i, o: captured.setdefault("y", o))
    logits(model, inputs("llama", model))
    y, idx = captured["y"], m.pruned_indices(LAYER)
    assert idx.numel() > 0 and torch.equal(y[..., idx], torch.zeros_like(y[..., idx]))
    assert (y[..., m.keep[LAYER]].abs() > 0).float().mean() > 0.9


def test_masks_on_an_offloaded_model_and_prune_refuses_meta_weights():
    """accelerate cpu_offload keeps weights on 'meta' between calls: masks live on the execution device, and
    permanent pruning (which needs the weights in memory) says so instead of silently zeroing nothing."""
    import accelerate
    x = inputs("llama", llama())
    masks = random_masks(llama())
    expected_model = llama()
    apply_masks(expected_model, masks)
    expected = logits(expected_model, x)
    offloaded = accelerate.cpu_offload(llama(), execution_device="cpu")
    apply_masks(offloaded, masks)
    torch.testing.assert_close(logits(offloaded, x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="offloaded"):
        prune_weights(accelerate.cpu_offload(llama(), execution_device="cpu"), masks)


def test_compact_model_matches_masks_and_unpatches():
    from manu_fast.layers import compact_width
    from manu_fast.masks import compact_model
    model = build("llava")
    x = inputs("llava", model)
    before = logits(model, x)
    masks = random_masks(model, fraction=0.4)
    patch = apply_masks(model, masks)
    masked = logits(model, x)
    assert compact_model(model) == masks.num_pruned()
    torch.testing.assert_close(logits(model, x), masked, rtol=1e-5, atol=1e-5)
    assert {n: info["neurons"] for n, info in fingerprint(model)["layers"].items()} == {
        n: compact_width(int(k.sum()), k.numel()) for n, k in masks.keep.items()}
    patch.unpatch()
    torch.testing.assert_close(logits(model, x), before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="apply_masks"):
        compact_model(build("llama"))
