"""NeuronStats: merge exactness, metrics, accuracy at |mean| >> std, safetensors round trip and refusals."""
import math

import pytest
import torch

from manu_fast import act_stats
from manu_fast.stats import (FIELD_INDEX, FIELDS, NeuronStats, StatsFileError, empty_stats, merge_partials, metrics,
                             pool_groups, segment_stats_reference)


def test_merge_is_exact_against_one_pass():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1000, 7, generator=g, dtype=torch.float64) * 3 + 5
    gid = torch.randint(-1, 3, (1000,), generator=g)
    whole = segment_stats_reference(a, gid, 3, 0.1)
    parts = torch.stack([segment_stats_reference(a[i:i + 137], gid[i:i + 137], 3, 0.1) for i in range(0, 1000, 137)])
    merged = merge_partials(parts)
    torch.testing.assert_close(merged, whole, rtol=1e-12, atol=1e-9)


def test_metrics_hand_computed():
    a = torch.tensor([[1.0, -2.0], [3.0, 0.05], [float("nan"), 0.0]])
    gid = torch.tensor([0, 0, 0])
    m = metrics(segment_stats_reference(a, gid, 1, 0.1)[:, 0])
    assert m["count"].tolist() == [2.0, 3.0]
    assert m["abs"].tolist() == pytest.approx([2.0, 2.05 / 3])
    assert m["freq"].tolist() == pytest.approx([1.0, 1 / 3])
    assert m["var"][0].item() == pytest.approx(1.0)  # population variance of {1, 3}
    assert m["rms"][0].item() == pytest.approx(math.sqrt(5.0))
    block = segment_stats_reference(a, gid, 1, 0.1)
    assert block[FIELD_INDEX["nonfinite"], 0].tolist() == [1.0, 0.0]


def test_empty_group_gives_nan_metrics_not_zero():
    block = empty_stats(2, 3)
    m = metrics(pool_groups(block, [0, 1]))
    assert torch.isnan(m["abs"]).all() and (m["count"] == 0).all()


def test_std_accurate_when_mean_dominates_1e7_tokens():
    """N(100, 1) over 10^7 tokens, fed batch by batch through the op: std within 1e-3 of a float64 two-pass."""
    g = torch.Generator().manual_seed(1)
    n_neurons, batch, batches = 4, 500_000, 20
    acc = empty_stats(1, n_neurons)
    xs = []
    for _ in range(batches):
        x = (torch.randn(batch, n_neurons, generator=g) + 100.0).float()
        xs.append(x)
        act_stats(x, act="identity", stats=acc, write_out=False)
    full = torch.cat(xs).double()
    ref_std = full.std(0, unbiased=False)
    std = metrics(acc[:, 0])["std"]
    assert acc[FIELD_INDEX["count"], 0, 0].item() == batch * batches
    assert ((std - ref_std).abs() / ref_std).max().item() < 1e-3


def _toy_block(groups: int, width: int) -> torch.Tensor:
    """Random statistics that a profiling run could have produced (integer counts, active <= count)."""
    block = torch.rand(len(FIELDS), groups, width, dtype=torch.float64)
    for name in ("count", "active", "nonfinite"):
        block[FIELDS.index(name)] = torch.randint(0, 10, (groups, width), dtype=torch.float64)
    block[FIELDS.index("active")] = torch.minimum(block[FIELDS.index("active")], block[FIELDS.index("count")])
    return block


def _toy_stats(fp):
    s = NeuronStats(["forget/multimodal/text", "retain/multimodal/text"], fp, 0.1)
    s.blocks["model.layers.0.mlp::hidden"] = _toy_block(2, 5)
    return s


FP = {"model_type": "llama", "layers": {"model.layers.0.mlp": {"kind": "gated", "tower": "language", "neurons": 5, "hidden": 8}}}


def test_save_load_roundtrip_and_refusals(tmp_path):
    s = _toy_stats(FP)
    p = tmp_path / "s.safetensors"
    s.save(p)
    t = NeuronStats.load(p, expect_fingerprint=FP)
    assert t.groups == s.groups and t.tau == s.tau
    torch.testing.assert_close(t.blocks["model.layers.0.mlp::hidden"], s.blocks["model.layers.0.mlp::hidden"], rtol=0, atol=0)
    other = {"model_type": "llama", "layers": {"model.layers.0.mlp": {"kind": "gated", "tower": "language", "neurons": 6, "hidden": 8}}}
    with pytest.raises(StatsFileError, match="made for another"):
        NeuronStats.load(p, expect_fingerprint=other)
    with pytest.raises(StatsFileError, match="made for a .llama. model .*, this model is a .llava."):
        NeuronStats.load(p, expect_fingerprint={**FP, "model_type": "llava"})
    raw = p.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(StatsFileError, match="not a readable"):
        NeuronStats.load(bad)
    with pytest.raises(FileNotFoundError):
        NeuronStats.load(tmp_path / "missing.safetensors")


def test_load_refuses_blocks_that_do_not_fit_the_fingerprint(tmp_path):
    """The checksum only proves the file is as written; a writer's block must still fit the model it names."""
    layer = "model.layers.0.mlp"
    good = _toy_stats(FP)
    good.blocks[f"{layer}::out"] = _toy_block(2, 8)  # out: the hidden width
    good.blocks[f"{layer}::up"] = _toy_block(2, 5)
    good.save(tmp_path / "good.safetensors")
    assert set(NeuronStats.load(tmp_path / "good.safetensors").blocks) == set(good.blocks)
    plain = {"model_type": "llama", "layers": {layer: {**FP["layers"][layer], "kind": "plain"}}}
    cases = {"wider than the layer": (FP, f"{layer}::hidden", 9, "inconsistent"),
             "out at the neuron width": (FP, f"{layer}::out", 5, "inconsistent"),
             "unknown site": (FP, f"{layer}::bogus", 5, "no site"),
             "unknown layer": (FP, "model.layers.7.mlp::hidden", 5, "no site"),
             "up on a plain MLP": (plain, f"{layer}::up", 5, "no site")}
    for name, (fp, key, width, message) in cases.items():
        bad = _toy_stats(fp)
        bad.blocks[key] = torch.rand(len(FIELDS), 2, width, dtype=torch.float64)
        path = tmp_path / f"{name.replace(' ', '_')}.safetensors"
        bad.save(path)
        with pytest.raises(StatsFileError, match=message):
            NeuronStats.load(path)


def _stats_of(values: dict[str, torch.Tensor], gid, groups, fp, tau=0.1) -> NeuronStats:
    blocks = {f"model.layers.0.mlp::{site}": segment_stats_reference(v, gid, len(groups), tau) for site, v in values.items()}
    return NeuronStats(list(groups), fp, tau, blocks)


def test_merge_of_two_shards_equals_the_whole():
    g = torch.Generator().manual_seed(3)
    groups = ["forget/multimodal/text", "retain/multimodal/text", "retain/text/text"]
    values = {"hidden": torch.randn(301, 5, generator=g, dtype=torch.float64) * 2 + 7,
              "out": torch.randn(301, 8, generator=g, dtype=torch.float64)}
    values["hidden"][17, 2] = float("nan")
    gid = torch.randint(-1, len(groups), (301,), generator=g)
    whole = _stats_of(values, gid, groups, FP)
    first = _stats_of({s: v[:140] for s, v in values.items()}, gid[:140], groups, FP)
    second = _stats_of({s: v[140:] for s, v in values.items()}, gid[140:], groups, FP).to("cpu")
    merged = first.merge(second)
    assert merged is first and merged.groups == groups
    for key, ref in whole.blocks.items():
        torch.testing.assert_close(merged.blocks[key], ref, rtol=1e-12, atol=1e-12)

    shard = _stats_of(values, gid, groups, FP)
    with pytest.raises(ValueError, match="different groups or tau"):
        shard.merge(_stats_of(values, gid, groups[::-1], FP))
    with pytest.raises(ValueError, match="different groups or tau"):
        shard.merge(_stats_of(values, gid, groups, FP, tau=0.2))
    wider = {"model_type": "llama", "layers": {"model.layers.0.mlp": {**FP["layers"]["model.layers.0.mlp"], "neurons": 6}}}
    with pytest.raises(StatsFileError, match="made for another"):
        shard.merge(_stats_of(values, gid, groups, wider))
    with pytest.raises(ValueError, match="different layers/sites"):
        shard.merge(_stats_of({"hidden": values["hidden"]}, gid, groups, FP))
