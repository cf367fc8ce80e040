"""Selection: every strategy's formula (docs/SELECTION.md) pinned on hand-computed numbers, top-k rules, errors."""
import math

import pytest
import torch

from manu_fast.masks import Masks
from manu_fast.select import EPS, natural_key, random_like, scores, select_neurons
from manu_fast.stats import FIELD_INDEX, NeuronStats, empty_stats

E = EPS
GROUPS = ["forget/multimodal/image", "forget/multimodal/text", "forget/text/text",
          "retain/multimodal/image", "retain/multimodal/text", "retain/text/text"]
VISION, L2, L10 = "vision.layers.0.mlp", "lm.layers.2.mlp", "lm.layers.10.mlp"
FINGERPRINT = {"model_type": "toy", "layers": {
    VISION: {"kind": "plain", "tower": "vision", "neurons": 3, "hidden": 2},
    L2: {"kind": "gated", "tower": "language", "neurons": 3, "hidden": 2},
    L10: {"kind": "gated", "tower": "language", "neurons": 3, "hidden": 2}}}


def set_group(block, g, count=4.0, abs=1.0, freq=0.5, var=1.0, rms=1.0):
    """Write a group's sufficient statistics so that its derived metrics are exactly the given ones."""
    t = lambda v: torch.as_tensor(v, dtype=torch.float64).expand(3)  # noqa: E731
    n = t(count)
    block[FIELD_INDEX["count"], g], block[FIELD_INDEX["mean"], g] = n, 0.0
    block[FIELD_INDEX["m2"], g], block[FIELD_INDEX["sum_abs"], g] = t(var) * n, t(abs) * n
    block[FIELD_INDEX["sum_sq"], g], block[FIELD_INDEX["active"], g] = t(rms) ** 2 * n, t(freq) * n


def toy_stats() -> NeuronStats:
    """Vision layer: only multimodal image tokens. Language layers: multimodal image tokens and text-only text."""
    blocks = {}
    for layer in (VISION, L2, L10):
        b = empty_stats(len(GROUPS), 3)
        live = (0, 3) if layer == VISION else (0, 2, 3, 5)
        for g in live:
            set_group(b, g)
        blocks[NeuronStats.key(layer, "hidden")] = b
    v, l2, l10 = (blocks[NeuronStats.key(n, "hidden")] for n in (VISION, L2, L10))
    set_group(v, 0, abs=[2, 1, 1], var=[1, 1, 4], rms=[2, 1, 2])
    set_group(v, 3, abs=[1, 1, 2], var=[1, 1, 1], rms=[1, 2, 2])
    set_group(l2, 0, abs=[3, 1, 1], freq=[1, 0.5, 0.5], rms=[2, 1, 1])
    set_group(l2, 2, abs=[1, 2, 3])
    set_group(l10, 2, var=[9, 1, 1])
    return NeuronStats(list(GROUPS), FINGERPRINT, 0.1, blocks)


def close(got, expected):
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_manu_code_formula_per_tower_modality():
    s = scores(toy_stats(), "manu-code")
    assert list(s) == [L2, L10, VISION]  # natural layer order
    # vision: multimodal forget (group 0) over retain (group 3); w = abs 2, std 2, rms 2
    close(s[VISION], [2 * (2 / (1 + E) - 1) + 2 * (1 / (1 + E) - 1) + 2 * (2 / (1 + E) - 1),
                      2 * (1 / (1 + E) - 1) + 2 * (1 / (1 + E) - 1) + 2 * (1 / (2 + E) - 1),
                      2 * (1 / (2 + E) - 1) + 2 * (2 / (1 + E) - 1) + 2 * (2 / (2 + E) - 1)])
    # language: text-only forget (group 2) over retain (group 5)
    one = 2 * (1 / (1 + E) - 1)
    close(s[L2], [3 * one, 2 * (2 / (1 + E) - 1) + 2 * one, 2 * (3 / (1 + E) - 1) + 2 * one])
    close(s[L10], [2 * (3 / (1 + E) - 1) + 2 * one, 3 * one, 3 * one])


def test_manu_code_custom_weights():
    s = scores(toy_stats(), "manu-code", weights={"freq": 1.0})
    close(s[L2], [0.5 / (0.5 + E) - 1] * 3)


def test_manu_paper_formula_language_only_by_default():
    s = scores(toy_stats(), "manu-paper")
    assert set(s) == {L2, L10}
    i_retain = math.sqrt(2)  # retain: identical modalities except var: sqrt(1 + 1)
    close(s[L2], [(2 / (4 + E) + 0.5 / (1.5 + E) + math.sqrt(2) + math.sqrt(3 / (5 + E))) / (i_retain + E),  # Z2: mean a^2 4 vs 1
                  (1 / (3 + E) + math.sqrt(2)) / (i_retain + E),
                  (2 / (4 + E) + math.sqrt(2)) / (i_retain + E)])
    close(s[L10], [math.sqrt(1 + 9) / (i_retain + E), 1.0 * math.sqrt(2) / (i_retain + E), math.sqrt(2) / (i_retain + E)])


def test_manu_paper_rms_term_uses_means_not_token_count_dependent_sums():
    st = toy_stats()
    b = st.block(L10, "hidden")
    for g in (0, 3):  # multimodal groups: twice the tokens of text-only, same per-token statistics
        set_group(b, g, count=8.0)
    for g in (2, 5):
        set_group(b, g, count=4.0)
    # identical per-token metrics in both modalities: I_abs = I_freq = I_rms = 0, I_var = sqrt(2) for both splits
    close(scores(st, "manu-paper")[L10], [math.sqrt(2) / (math.sqrt(2) + E)] * 3)


def test_power_ratio_formula_both_modalities_on_the_language_model():
    s = scores(toy_stats(), "power-ratio")
    assert list(s) == [L2, L10, VISION]  # every tower: image towers on multimodal data, the language model on both
    close(s[VISION], [4 / (1 + E), 1 / (4 + E), 4 / (4 + E)])  # mean a^2 = rms^2, forget (group 0) / retain (3)
    # multimodal (groups 0 / 3: rms 2,1,1 vs 1) plus text-only (groups 2 / 5: rms 1 vs 1)
    close(s[L2], [4 / (1 + E) + 1 / (1 + E), 2 / (1 + E), 2 / (1 + E)])
    close(s[L10], [2 / (1 + E)] * 3)  # a variance change without an a^2 change is no signal for this score
    st = toy_stats()
    for g, rms in ((0, 3.0), (3, 1.0), (2, 2.0), (5, 4.0)):  # rms changes that leave mean |a| alone
        set_group(st.block(L10), g, rms=rms)
    close(scores(st, "power-ratio")[L10], [9 / (1 + E) + 4 / (16 + E)] * 3)


def test_selective_pruning_formula():
    s = scores(toy_stats(), "selective-pruning", metric="abs")  # default modality: text -> language model
    close(s[L2], [1 / (1 + E), 2 / (1 + E), 3 / (1 + E)])
    s = scores(toy_stats(), "selective-pruning", metric="rms", modality="multimodal")
    close(s[VISION], [2 / (1 + E), 1 / (2 + E), 2 / (2 + E)])
    close(s[L2], [2 / (1 + E), 1 / (1 + E), 1 / (1 + E)])


def test_token_kinds_pool_groups():
    st = toy_stats()
    for n in (L2, L10):
        set_group(st.block(n), 1, count=12, abs=[5, 5, 5])  # forget/multimodal/text: 12 tokens of mean |a| 5
        set_group(st.block(n), 4, count=12, abs=[1, 1, 1])
    pooled = scores(st, "selective-pruning", metric="abs", modality="multimodal", towers=["language"])
    close(pooled[L2], [(4 * 3 + 12 * 5) / 16 / (1 + E), (4 * 1 + 12 * 5) / 16 / (1 + E), (4 * 1 + 12 * 5) / 16 / (1 + E)])
    text_only = scores(st, "selective-pruning", metric="abs", modality="multimodal", towers=["language"], token_kinds="text")
    close(text_only[L2], [5 / (1 + E)] * 3)


def pruned(masks):
    return {n: (~k).nonzero().flatten().tolist() for n, k in masks.keep.items()}


def test_manu_code_top_k_per_tower_union_and_ties_by_layer_order():
    # alpha 20: vision k = round(0.6) = 1, language k = round(1.2) = 1; L2 n2 and L10 n0 tie at the top
    m = select_neurons(toy_stats(), "manu-code", 20)
    assert pruned(m) == {VISION: [0], L2: [2], L10: []}
    assert natural_key(L2) < natural_key(L10) and L10 < L2  # layer order is natural, not alphabetical
    assert m.num_pruned() == 2 and m.by_tower() == {"vision": (1, 3), "language": (1, 6)}
    assert list(m.by_tower()) == ["vision", "language"]  # the towers' order, not their layer names' (the README's line)
    assert m.description["strategy"] == "manu-code" and m.fingerprint == FINGERPRINT


def test_global_vs_per_layer_and_ties_by_index():
    m = select_neurons(toy_stats(), "selective-pruning", 34, metric="abs")  # k = round(2.04) = 2 of 6
    assert pruned(m) == {L2: [1, 2], L10: []}
    m = select_neurons(toy_stats(), "selective-pruning", 34, metric="abs", per_layer=True)  # k = round(1.02) = 1
    assert pruned(m) == {L2: [2], L10: [0]}  # L10's scores all tie: lowest index first


def test_all_ties_follow_layer_then_index_order():
    st = toy_stats()
    for n in (L2, L10):
        for g in range(len(GROUPS)):
            if st.block(n)[FIELD_INDEX["count"], g, 0] > 0:
                set_group(st.block(n), g)
    m = select_neurons(st, "manu-paper", 50)  # k = 3 of 6, all scores equal
    assert pruned(m) == {L2: [0, 1, 2], L10: []}


def test_random_count_seed_and_random_like():
    st = toy_stats()
    a = select_neurons(st, "random", 50, seed=3)
    assert a.by_tower() == {"vision": (2, 3), "language": (3, 6)}  # round(1.5) = 2, round(3) = 3
    assert pruned(select_neurons(st, "random", 50, seed=3)) == pruned(a)
    assert any(pruned(select_neurons(st, "random", 50, seed=s)) != pruned(a) for s in range(4, 10))
    ref = select_neurons(st, "manu-code", 20)
    like = random_like(ref, seed=1)
    assert like.by_tower() == ref.by_tower()
    assert pruned(random_like(ref, seed=1)) == pruned(like)


@pytest.mark.parametrize("alpha", [0, 100, -1, 150, float("nan")])
def test_alpha_out_of_range(alpha):
    with pytest.raises(ValueError, match="alpha"):
        select_neurons(toy_stats(), "manu-code", alpha)


def test_empty_group_is_a_clear_error_not_nan():
    with pytest.raises(ValueError, match="forget/text/.*empty at layer 'vision"):
        select_neurons(toy_stats(), "manu-paper", 10, towers=["vision"])
    with pytest.raises(ValueError, match="forget/multimodal/text.*empty"):
        scores(toy_stats(), "selective-pruning", modality="multimodal", token_kinds="text")
    st = toy_stats()
    st.groups = [g for g in GROUPS]
    st.groups[5] = "other/text/text"  # no retain/text group at all
    with pytest.raises(ValueError, match="no group retain/text/\\*"):
        scores(st, "manu-code")


def test_neuron_that_saw_only_nan_is_named_as_such():
    st = toy_stats()
    b = st.block(L2, "hidden")
    b[:, 2, 1] = 0.0  # forget/text/text, neuron 1: no finite value ...
    b[FIELD_INDEX["nonfinite"], 2, 1] = 4.0  # ... because all four were NaN/Inf
    with pytest.raises(ValueError, match="1 neuron\\(s\\) saw only NaN/Inf"):
        scores(st, "manu-code")


def test_alive_scores_only_alive_neurons_and_is_cumulative():
    st = toy_stats()
    first = select_neurons(st, "selective-pruning", 34, metric="abs")  # prunes L2 n1, n2
    second = select_neurons(st, "selective-pruning", 34, metric="abs", alive=first)
    assert pruned(second) == {L2: [0, 1, 2], L10: [0]}  # 2 more: L2 n0 (score 1/(1+E)) then L10 n0 (tie, later layer)
    assert second.description["previous"] == first.description
    with pytest.raises(ValueError, match="only 2 are alive"):
        select_neurons(st, "selective-pruning", 60, metric="abs", alive=second)
    with pytest.raises(ValueError, match="site"):
        select_neurons(st, "selective-pruning", 10, alive=Masks.all_kept(FINGERPRINT, "out"))


def test_option_errors():
    with pytest.raises(ValueError, match="unknown strategy"):
        scores(toy_stats(), "magic")
    with pytest.raises(ValueError, match="selective-pruning only"):
        scores(toy_stats(), "manu-code", metric="abs")
    with pytest.raises(ValueError, match="unknown metric"):
        scores(toy_stats(), "selective-pruning", metric="var2")
    with pytest.raises(ValueError, match="unknown metric weights"):
        scores(toy_stats(), "manu-code", weights={"mean": 1})
    with pytest.raises(ValueError, match="no statistics at site 'pre': the file was profiled at sites hidden; select at"):
        scores(toy_stats(), "manu-code", site="pre")


def test_per_tower_alpha():
    m = select_neurons(toy_stats(), "manu-code", {"vision": 34, "language": 50})
    assert m.by_tower() == {"vision": (1, 3), "language": (3, 6)}  # k = floor(alpha/100 * n + 0.5) per tower
    assert torch.equal(m.keep[VISION], select_neurons(toy_stats(), "manu-code", 34).keep[VISION])
    only = select_neurons(toy_stats(), "manu-code", {"language": 50})
    assert only.num_pruned("vision") == 0 and only.num_pruned("language") == 3
    with pytest.raises(ValueError, match="'lm' is no tower .* matches no scored layer"):
        select_neurons(toy_stats(), "manu-code", {"lm": 10})
    with pytest.raises(ValueError, match="in \\(0, 100\\)"):
        select_neurons(toy_stats(), "manu-code", {"language": 100})


def test_per_layer_alpha_names_and_patterns():
    st = toy_stats()
    only = select_neurons(st, "power-ratio", {L10: 34})  # one layer, its own pool: k = round(1.02) = 1
    assert pruned(only) == {L2: [], L10: [0], VISION: []}  # L10's scores tie: lowest index; other layers untouched
    mixed = select_neurons(st, "power-ratio", {"language": 34, L10: 67, "vision": 34})
    assert pruned(mixed) == {L2: [0], L10: [0, 1], VISION: [0]}  # L10 alone (k = 2), L2 is the rest of the tower (k = 1)
    both = select_neurons(st, "power-ratio", {"lm.layers.*.mlp": 34})  # a pattern: each matched layer is a pool
    assert pruned(both) == {L2: [0], L10: [0], VISION: []}
    assert pruned(select_neurons(st, "power-ratio", 34, per_layer=True)) == {L2: [0], L10: [0], VISION: [0]}
    with pytest.raises(ValueError, match="'lm.layers.7.mlp' is no tower .* matches no scored layer"):
        select_neurons(st, "power-ratio", {"lm.layers.7.mlp": 10})
    with pytest.raises(ValueError, match="matches two alpha keys"):
        select_neurons(st, "power-ratio", {"lm.layers.*": 10, L2: 20})
    with pytest.raises(ValueError, match="at least one tower"):
        select_neurons(st, "power-ratio", {})


def test_random_like_per_layer_matches_layer_counts():
    ref = select_neurons(toy_stats(), "power-ratio", {L2: 34, L10: 67})
    counts = {n: len(p) for n, p in pruned(ref).items()}
    assert counts == {L2: 1, L10: 2, VISION: 0}
    for seed in range(6):
        like = random_like(ref, seed=seed, per_layer=True)
        assert {n: len(p) for n, p in pruned(like).items()} == counts
        assert like.description["per_layer"] and like.description["like"] == ref.description
    per_tower = [random_like(ref, seed=seed) for seed in range(20)]  # per tower only the total of 3 is kept
    assert all(m.num_pruned("language") == 3 for m in per_tower)
    assert any({n: len(p) for n, p in pruned(m).items()} != counts for m in per_tower)
