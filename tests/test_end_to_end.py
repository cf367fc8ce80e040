"""End to end on a tiny LLaVA: profile -> select -> mask/prune; outputs change only through the selected neurons."""
import copy

import torch

import tiny_models as tm
from manu_fast.adapters import find_mlps, patch_model
from manu_fast.masks import apply_masks, prune_weights, remove_masks
from manu_fast.profiler import profile
from manu_fast.select import select_neurons


def _logits(model, kw):
    with torch.no_grad():
        return model(**kw).logits


def test_tiny_llava_profile_select_prune():
    model = tm.build("llava")
    stock = copy.deepcopy(model)
    data = {("forget", "multimodal"): [tm.inputs("llava", model, seed=1)],
            ("forget", "text"): [tm.inputs("llava", model, multimodal=False, seed=2)],
            ("retain", "multimodal"): [tm.inputs("llava", model, seed=3)],
            ("retain", "text"): [tm.inputs("llava", model, multimodal=False, seed=4)]}
    kw = tm.inputs("llava", model, seed=9)
    before = _logits(model, kw)

    stats = profile(model, data, progress=False)
    masks = select_neurons(stats, "manu-code", alpha=10)
    assert 0 < masks.num_pruned() < masks.num_total()
    assert {masks.tower(n) for n, k in masks.keep.items() if not k.all()} >= {"vision", "language"}

    # reversible: pruned neurons are exactly zero at the input of down_proj / fc2, the others are untouched
    patch = patch_model(model)
    seen = {}
    hooks = [layer.out_linear.register_forward_pre_hook(lambda m, a, n=name: seen.__setitem__(n, a[0].detach().clone()))
             for name, layer in patch.layers.items()]
    _logits(model, kw)
    unmasked = dict(seen)
    apply_masks(model, masks, name="forget")
    masked_out = _logits(model, kw)
    assert not torch.allclose(masked_out, before)
    for name, keep in masks.keep.items():
        h0, h1 = unmasked[name], seen[name]
        assert (h1[..., ~keep] == 0).all(), name
        if name == "model.vision_tower.encoder.layers.0.mlp":  # upstream of every other mask: kept neurons unchanged
            # (up to the fused kernel's activation rounding vs PyTorch's, ~1 ulp)
            torch.testing.assert_close(h1[..., keep], h0[..., keep], rtol=1e-6, atol=1e-6)
    for hd in hooks:
        hd.remove()
    remove_masks(model, "forget")
    assert torch.equal(_logits(model, kw), before)  # no mask, no profiler: the fused layers run the HF forward

    # permanent: the stock model with zeroed weights gives the masked outputs; only selected neurons' weights change
    pruned = copy.deepcopy(stock)
    prune_weights(pruned, masks)
    torch.testing.assert_close(_logits(pruned, kw), masked_out, rtol=1e-5, atol=1e-5)
    mlps = {i.name: i for i in find_mlps(stock)}
    pmlps = {i.name: i for i in find_mlps(pruned)}
    for name, keep in masks.keep.items():
        info, pinfo = mlps[name], pmlps[name]
        for lin in info.linears[:-1]:
            w0, w1 = getattr(info.module, lin).weight, getattr(pinfo.module, lin).weight
            assert torch.equal(w1[keep], w0[keep]) and (w1[~keep] == 0).all()
        w0, w1 = getattr(info.module, info.linears[-1]).weight, getattr(pinfo.module, info.linears[-1]).weight
        assert torch.equal(w1[:, keep], w0[:, keep]) and (w1[:, ~keep] == 0).all()
