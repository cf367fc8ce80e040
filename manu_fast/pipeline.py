"""Loops that combine the siblings profiler, select and masks: iterative pruning (profile -> select -> mask,
``rounds`` times) and budget calibration (select at each candidate budget, mask, evaluate on validation data)."""
from __future__ import annotations

from collections.abc import Mapping

from tqdm.auto import tqdm

from .evaluate import evaluate
from .masks import Masks, apply_masks, remove_masks
from .profiler import profile
from .schema import MODALITIES, data_key
from .select import check_alpha, select_neurons


def iterative_prune(model, data, rounds: int, strategy: str = "manu-code",
                    alpha_per_round: float | Mapping[str, float] = 2.0, *,
                    mask_name: str = "forget", site: str = "hidden", profile_kwargs: dict | None = None,
                    seed: int = 0, **select_kwargs) -> Masks:
    """``rounds`` of profile -> select -> mask: each round profiles the model with the masks so far applied
    (reversibly, as mask ``mask_name``) and prunes ``alpha_per_round`` % more of the still-alive neurons
    (alpha counted on every neuron of a pool). Returns the cumulative masks, left applied on the model.

    ``data`` is the profiler's dict (split, modality) -> batches; each value is iterated once per round, so
    it must be re-iterable (a list, a DataLoader), not a one-shot generator.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if "alive" in select_kwargs:
        raise ValueError("iterative_prune tracks the alive neurons itself; apply earlier masks to the model instead")
    for key, batches in data.items():
        if iter(batches) is batches:
            raise ValueError(f"data[{key}] is a one-shot iterator; iterative pruning needs a re-iterable (list, DataLoader)")
    check_alpha(alpha_per_round)
    masks = None
    for r in range(rounds):
        if masks is not None:
            apply_masks(model, masks, mask_name)
        stats = profile(model, data, sites=(site,), **(profile_kwargs or {}))
        masks = select_neurons(stats, strategy, alpha_per_round, site=site, alive=masks, seed=seed + r, **select_kwargs)
    apply_masks(model, masks, mask_name)
    return masks


def drop_points(metrics: dict, baseline: dict) -> dict:
    return {k: 100 * (baseline[k]["accuracy"] - v["accuracy"]) for k, v in metrics.items()}


def calibrate_budget(model, stats, select_kwargs: dict, candidates: list[dict], validation: dict, retain_limit: float,
                     progress: bool = True) -> dict:
    """Choose a pruning budget on validation data (the profiling questions): of the ``candidates`` (alpha
    mappings), the one whose smaller forget drop of the two modalities is largest (then the larger sum) among
    those whose retain drop is at most ``retain_limit`` points in each modality; ties go to fewer pruned
    neurons, then to the earlier candidate. With none under the limit, the one with the smallest worst retain
    drop. (Each modality is held to the line on its own, as the targets hold them.)

    Returns {"alpha", "validation_drop" (points), "met_limit", "tried" (every candidate's pruned count and drops)}."""
    if not candidates:
        raise ValueError("calibrate_budget needs at least one candidate budget")
    baseline = evaluate(model, validation)
    tried = []
    for alpha in tqdm(candidates, desc="calibrate budget", disable=not progress, leave=False):
        masks = select_neurons(stats, alpha=alpha, **select_kwargs)
        apply_masks(model, masks, "calibrate")
        try:
            drop = drop_points(evaluate(model, validation), baseline)
        finally:
            remove_masks(model, "calibrate")
        tried.append({"alpha": alpha, "pruned": masks.num_pruned(), "drop": drop})
    best, met = choose_budget(tried, retain_limit)
    return {"alpha": best["alpha"], "validation_drop": best["drop"], "met_limit": met, "tried": tried}


def choose_budget(tried: list[dict], retain_limit: float) -> tuple[dict, bool]:
    """(the chosen try, whether it met the limit) among ``tried`` ({"pruned", "drop"}), by calibrate_budget's rule."""
    def forget(t):
        drops = [t["drop"][data_key("forget", m)] for m in MODALITIES]
        return min(drops), sum(drops)

    def retain(t):
        return max(t["drop"][data_key("retain", m)] for m in MODALITIES)

    ok = [t for t in tried if retain(t) <= retain_limit]
    if ok:
        return max(ok, key=lambda t: (*forget(t), -t["pruned"])), True
    return min(tried, key=lambda t: (retain(t), t["pruned"])), False
