"""Adapters and fused layers on real HF architectures (tiny configs, random weights, no downloads).

For every supported architecture: patching keeps outputs (float32, <= 1e-5), unpatching restores the
model exactly, and profiled statistics equal a float64 computation from plain forward hooks on the
unpatched model.
"""
import pytest
import torch
import transformers as tf

import tiny_models as tm  # noqa: E402
from manu_fast.adapters import UnsupportedModelError, find_mlps, fingerprint, get_patch, patch_model
from manu_fast.layers import FusedGatedMLP, FusedMLP, compact_width
from manu_fast.profiler import Profiler, profile
from manu_fast.stats import F, group_label, segment_stats_reference

ARCHS = list(tm.ARCHS)


def _out(model, kw):
    with torch.no_grad():
        o = model(**kw)
    return o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state


def _data(name, model):
    kind = tm.ARCHS[name][1]
    data = {("forget", "multimodal" if kind != "text" else "text"): [tm.inputs(name, model, seed=1)]}
    if kind == "mm":
        data[("retain", "text")] = [tm.inputs(name, model, multimodal=False, seed=2)]
    return data


def _hook_reference(name, model, data):
    """float64 statistics of every MLP intermediate, captured by forward pre-hooks on down_proj/fc2 of the stock model."""
    infos = find_mlps(model)
    groups = [group_label(s, m, k) for (s, m) in data for k in ("image", "text")]
    captured, out = {}, {}
    handles = [getattr(i.module, i.linears[-1]).register_forward_pre_hook(
        lambda mod, args, n=i.name: captured.setdefault(n, []).append(args[0].detach().reshape(-1, args[0].shape[-1])))
        for i in infos]
    try:
        for (split, modality), batches in data.items():
            for kw in batches:
                captured.clear()
                _out(model, kw)
                for i in infos:
                    if i.name not in captured:  # e.g. the vision tower on text-only data
                        continue
                    h = torch.cat(captured[i.name])
                    if i.tower == "language":
                        gid = torch.full(kw["input_ids"].shape, groups.index(group_label(split, modality, "text")),
                                         device=kw["input_ids"].device)
                        gid[kw["input_ids"] == tm.IMAGE_TOKEN] = groups.index(group_label(split, modality, "image"))
                        gid[kw["attention_mask"] == 0] = -1
                    else:
                        gid = torch.full((h.shape[0],), groups.index(group_label(split, modality, "image")))
                    part = segment_stats_reference(h, gid.reshape(-1), len(groups), 0.1)
                    out.setdefault(i.name, []).append(part)
    finally:
        for hd in handles:
            hd.remove()
    from manu_fast.stats import merge_partials
    return {n: merge_partials(torch.stack(p)) for n, p in out.items()}


@pytest.mark.parametrize("name", ARCHS)
def test_patch_same_outputs_unpatch_exact_and_stats_match_hooks(name):
    model = tm.build(name)
    data = _data(name, model)
    kw = next(iter(data.values()))[0]
    originals = {i.name: i.module for i in find_mlps(model)}
    towers = {i.tower for i in find_mlps(model)}
    expected_towers = {"mm": {"vision", "language"}, "text": {"language"}, "vision": {"vision"}}[tm.ARCHS[name][1]]
    assert expected_towers <= towers
    before = _out(model, kw)
    ref = _hook_reference(name, model, data)
    weights = {k: v.data_ptr() for k, v in model.state_dict().items()}

    patch = patch_model(model)
    assert patch_model(model) is patch  # idempotent
    assert set(patch.layers) == set(originals)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == weights  # same keys, no copy
    torch.testing.assert_close(_out(model, kw), before, rtol=0, atol=1e-5)
    for layer in patch.layers.values():  # all-keep mask routes through the fused op: still equal
        layer.set_mask("all", torch.ones(layer.num_neurons, dtype=torch.bool))
    torch.testing.assert_close(_out(model, kw), before, rtol=0, atol=1e-5)
    for layer in patch.layers.values():
        layer.remove_mask("all")

    stats = profile(model, data, progress=False)
    assert set(stats.layers()) == set(originals)
    for layer_name, r in ref.items():
        got = stats.block(layer_name)
        torch.testing.assert_close(got[F["count"]], r[F["count"]], rtol=0, atol=0)
        torch.testing.assert_close(got, r, rtol=1e-5, atol=1e-6)
    # statistics of the forget data never leak into other groups
    assert stats.fingerprint == fingerprint(model)

    patch.unpatch()
    assert get_patch(model) is None
    assert {i.name: i.module for i in find_mlps(model)} == originals  # the very same module objects
    torch.testing.assert_close(_out(model, kw), before, rtol=0, atol=0)


def test_mask_zeroes_exactly_the_masked_neurons_and_composes():
    model = tm.build("llama")
    kw = tm.inputs("llama", model)
    patch = patch_model(model)
    name, layer = next(iter(patch.layers.items()))
    seen = []
    hd = layer.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    a = torch.ones(layer.num_neurons, dtype=torch.bool)
    a[[1, 5]] = False
    b = torch.ones(layer.num_neurons, dtype=torch.bool)
    b[[5, 7]] = False
    layer.set_mask("a", a)
    layer.set_mask("b", b)
    _out(model, kw)
    h = seen[-1]
    assert (h[..., [1, 5, 7]] == 0).all() and (h[..., [0, 2, 3]] != 0).all()
    layer.enable_mask("b", False)
    _out(model, kw)
    assert (seen[-1][..., 7] != 0).all() and (seen[-1][..., [1, 5]] == 0).all()
    assert layer.mask_names() == ["a", "b"]
    with pytest.raises(ValueError, match="neurons"):
        layer.set_mask("bad", torch.ones(3, dtype=torch.bool))
    hd.remove()


def test_compact_layer_matches_masked_layer():
    model = tm.build("llava")
    patch = patch_model(model)
    for layer in patch.layers.values():
        keep = torch.rand(layer.num_neurons, generator=torch.Generator().manual_seed(3)) > 0.3
        layer.set_mask("m", keep)
        x = torch.randn(5, layer.in_proj[0].in_features)
        small = layer.compact()
        assert small.num_neurons == compact_width(int(keep.sum()), layer.num_neurons)
        torch.testing.assert_close(small(x), layer(x), rtol=1e-5, atol=1e-5)


def test_compact_widths_are_multiples_of_64_and_padding_is_exact():
    assert [compact_width(k, 11008) for k in (10788, 10816, 9907, 0, 1, 64, 65, 11008)] == \
        [10816, 10816, 9920, 0, 64, 64, 128, 11008]
    assert compact_width(90, 100) == 100 and compact_width(30, 100) == 64  # never wider than the layer
    g = torch.Generator().manual_seed(0)
    lin = [torch.nn.Linear(8, 150) for _ in range(2)] + [torch.nn.Linear(150, 8)]
    for m in lin:
        torch.nn.init.normal_(m.weight, generator=g)
        torch.nn.init.normal_(m.bias, generator=g)
    layer = FusedGatedMLP(*lin, torch.nn.SiLU())
    keep = torch.rand(150, generator=g) > 0.5
    keep[:3] = False  # (some pruned neurons for sure)
    layer.set_mask("m", keep)
    small = layer.compact()
    k = int(keep.sum())
    assert small.num_neurons == 128 and k < 128
    assert (small.gate_proj.weight[k:] == 0).all() and (small.gate_proj.bias[k:] == 0).all()
    assert (small.down_proj.weight[:, k:] == 0).all()
    x = torch.randn(7, 8, generator=g)
    torch.testing.assert_close(small(x), layer(x), rtol=1e-5, atol=1e-5)


def test_unknown_architecture_lists_what_was_found_and_how_to_register():
    model = tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(vocab_size=50, hidden_size=16, intermediate_size=24,
                                                  num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(UnsupportedModelError, match="register_model"):
        patch_model(model)
    with pytest.raises(UnsupportedModelError, match="not in manu_fast.adapters.MODEL_TABLE"):
        find_mlps(model)


def test_profile_mask_and_padding_are_ignored_and_memory_is_constant():
    model = tm.build("llama")
    kw = tm.inputs("llama", model, batch=2, text_len=6, pad=2)
    pm = torch.zeros_like(kw["input_ids"], dtype=torch.bool)
    pm[:, :3] = True
    stats = profile(model, {("forget", "text"): [dict(kw, profile_mask=pm)]}, progress=False)
    block = stats.block("model.layers.0.mlp")
    assert block[F["count"], stats.groups.index("forget/text/text")].unique().tolist() == [6.0]
    sizes = {k: v.numel() for k, v in stats.blocks.items()}
    longer = profile(model, {("forget", "text"): [tm.inputs("llama", model, batch=4, text_len=40)] * 3}, progress=False)
    assert {k: v.numel() for k, v in longer.blocks.items()} == sizes  # O(neurons), not O(tokens)


def test_profiler_sites_pre_up_out_match_hooks():
    model = tm.build("llama")
    kw = tm.inputs("llama", model, pad=0)
    info = find_mlps(model)[0]
    caps = {}
    hds = [getattr(info.module, n).register_forward_hook(lambda m, a, o, n=n: caps.__setitem__(n, o.detach().reshape(-1, o.shape[-1])))
           for n in ("gate_proj", "up_proj", "down_proj")]
    _out(model, kw)
    for h in hds:
        h.remove()
    stats = profile(model, {("retain", "text"): [kw]}, sites=("hidden", "pre", "up", "out"), progress=False)
    gid = torch.full((caps["gate_proj"].shape[0],), stats.groups.index("retain/text/text"))
    for site, cap in (("pre", "gate_proj"), ("up", "up_proj"), ("out", "down_proj")):
        ref = segment_stats_reference(caps[cap], gid, len(stats.groups), 0.1)
        torch.testing.assert_close(stats.block(info.name, site), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="sites"):
        Profiler(model, ["a/b/c"], sites=("bogus",))


def test_gradients_flow_through_masked_and_profiled_layers():
    """The compiled backends have no autograd: with gradients wanted, h comes from PyTorch (masked), stats still gathered."""
    model = tm.build("llama")
    kw = tm.inputs("llama", model, pad=0)
    patch = patch_model(model)
    layer = next(iter(patch.layers.values()))
    keep = torch.ones(layer.num_neurons, dtype=torch.bool)
    keep[[0, 3]] = False
    layer.set_mask("m", keep)
    with Profiler(model, ["forget/text/image", "forget/text/text"]) as prof:
        prof.set_batch("forget", "text", kw["input_ids"], kw["attention_mask"])
        model(**kw).logits.sum().backward()
    grad = layer.gate_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert (grad[[0, 3]] == 0).all() and (layer.down_proj.weight.grad[:, [0, 3]] == 0).all()  # pruned: no gradient
    assert prof.stats.block(next(iter(patch.layers)))[F["count"], 1].sum() > 0


def test_zero_neuron_layer():
    from manu_fast import act_stats
    h = act_stats(torch.zeros(3, 0), torch.zeros(3, 0))
    assert h.shape == (3, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the fused layer's GPU path (Triton)")
@pytest.mark.parametrize("name", ["llava", "qwen2_5_vl"])
def test_cuda_patch_and_stats_match_hooks(name):
    model = tm.build(name).cuda()
    data = {k: [{n: t.cuda() for n, t in b.items()} for b in v] for k, v in _data(name, model).items()}
    kw = next(iter(data.values()))[0]
    before = _out(model, kw)
    ref = _hook_reference(name, model, data)
    patch = patch_model(model)
    for layer in patch.layers.values():
        layer.set_mask("all", torch.ones(layer.num_neurons, dtype=torch.bool))
    torch.testing.assert_close(_out(model, kw), before, rtol=1e-4, atol=1e-4)  # TF32/fused GEMM on GPU
    for layer in patch.layers.values():
        layer.remove_mask("all")
    stats = profile(model, data, progress=False)
    for layer_name, r in ref.items():
        got = stats.block(layer_name)
        torch.testing.assert_close(got[F["count"]], r[F["count"]], rtol=0, atol=0)
        torch.testing.assert_close(got, r, rtol=1e-3, atol=1e-4)
