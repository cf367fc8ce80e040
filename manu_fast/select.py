"""Neuron selection: importance scores from NeuronStats, then a deterministic top-alpha %.

Every strategy's formula, its source and status, and the top-k rules are in docs/SELECTION.md; in short
(metrics of a (split, modality) are pooled over the chosen token kinds; F = forget, R = retain, eps = 1e-5):

- ``manu-code`` (the official score formula on exact token statistics, per layer): per modality
  ``S_m = sum_k w_k (F_k / (R_k + eps) - 1)``, ``w = {abs: 2, freq: 0, std: 2, rms: 2}``; image towers scored on
  multimodal data, the language model on text-only data; top alpha % per tower.
- ``manu-official`` (the official code's selection as it runs, ``manu_fast.official``): the same formula on the
  official statistics of ``profile(..., statistics="official")``, one top-k per tower over Linear rows.
- ``manu-paper`` (experimental: our reading of the paper's summary formulas; on the demo it selects neurons that
  carry nothing, see docs/SELECTION.md): ``S = I(F) / (I(R) + eps)`` with the cross-modal importance
  ``I = I_abs + I_freq + I_var + I_rms`` of each split; language model only by default; global top alpha %.
- ``selective-pruning`` (Pochinkov & Schoots 2024): one modality, ``S = M(F) / (M(R) + eps)`` for one metric M;
  global top alpha %.
- ``power-ratio`` (this project's): ``S = sum_m P_F,m / (P_R,m + eps)`` with ``P = mean a^2``, summed over every
  modality whose data reaches the layer (image towers: multimodal; language model: multimodal and text-only);
  top alpha % per tower, or per layer with a per-layer ``alpha``.
- ``random``: i.i.d. uniform scores from a seeded generator, top alpha % per tower (``random_like`` matches the
  counts of any other Masks, per tower or per layer).

``alpha`` is a percentage, or a mapping from tower names and layer names (fnmatch patterns allowed) to
percentages: a layer named by a pattern is its own top-k pool, the other layers of a named tower share the
tower's pool, layers named nowhere are not pruned. Top-k: ``k = floor(alpha / 100 * n + 0.5)`` per pool of n
neurons (already pruned ones counted in n, only ``alive`` ones candidates). Ties: higher score first, then
earlier layer (natural order of names), then lower neuron index.
"""
from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable, Mapping

import torch

from .masks import Masks
from .official import OfficialStats, select_official
from .schema import IMAGE_TOWERS, METRICS, MODALITIES, SITES, STRATEGIES, TOWERS
from .stats import FIELD_INDEX, NeuronStats, metrics, pool_groups

EPS = 1e-5
MANU_CODE_WEIGHTS = {"abs": 2.0, "freq": 0.0, "std": 2.0, "rms": 2.0}


def natural_key(name: str):
    """Sort key that orders 'layers.2' before 'layers.10'."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name)]


def _check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    if strategy == "manu-official":
        raise ValueError("manu-official scores the official statistics: select_neurons(official_stats, "
                         "'manu-official', alpha) (manu_fast.official)")


def _tower(stats: NeuronStats, layer: str) -> str:
    return stats.fingerprint["layers"][layer].get("tower", "unknown")


def default_towers(stats: NeuronStats, strategy: str, modality: str | None, site: str = "hidden") -> tuple[str, ...]:
    """Towers a strategy scores when the caller names none: every profiled tower its data reaches."""
    present = tuple(dict.fromkeys(_tower(stats, n) for n in sorted(stats.layers(site), key=natural_key)))
    if strategy == "manu-paper" or (strategy == "selective-pruning" and modality == "text"):
        return tuple(t for t in present if t not in IMAGE_TOWERS)
    return present


def considered_layers(stats: NeuronStats, site: str, towers: Iterable[str]) -> list[str]:
    towers = set(towers)
    layers = sorted((n for n in stats.layers(site) if _tower(stats, n) in towers), key=natural_key)
    if not layers:
        profiled = [s for s in SITES if stats.layers(s)]
        if site not in profiled:
            raise ValueError(f"no statistics at site {site!r}: the file was profiled at sites {', '.join(profiled)}; "
                             f"select at one of them (site=..., CLI --site)")
        raise ValueError(f"no statistics at site {site!r} for towers {sorted(towers)}; "
                         f"the file has {sorted(stats.blocks)[:4]}...")
    return layers


class _Metrics:
    """Pooled metrics of each (split, modality) over the chosen token kinds, with clear errors for empty groups."""

    def __init__(self, stats: NeuronStats, site: str, token_kinds):
        self.stats, self.site = stats, site
        self.kinds = None if token_kinds is None else ([token_kinds] if isinstance(token_kinds, str) else list(token_kinds))

    def __call__(self, layer: str, split: str, modality: str) -> dict[str, torch.Tensor]:
        ids = self.stats.group_ids(split, modality, self.kinds)
        kinds = "/".join(self.kinds) if self.kinds else "*"
        what = f"{split}/{modality}/{kinds}"
        if not ids:
            raise ValueError(f"the statistics have no group {what} (groups: {', '.join(self.stats.groups)})")
        block = pool_groups(self.stats.block(layer, self.site), ids)
        m = metrics(block)
        empty = m["count"] == 0
        if bool(empty.any()):
            poisoned = int((block[FIELD_INDEX["nonfinite"]][empty] > 0).sum())
            if poisoned:
                raise ValueError(f"group {what} at layer {layer!r}: {poisoned} neuron(s) saw only NaN/Inf values, so "
                                 "their scores are undefined; fix the model/inputs (profile with on_nonfinite='error' "
                                 "to find the batch)")
            raise ValueError(f"group {what} is empty at layer {layer!r} (no tokens profiled there); "
                             "profile that split and modality, or choose other towers/token kinds")
        return m


def _manu_code(get, layer, modality, weights):
    f, r = get(layer, "forget", modality), get(layer, "retain", modality)
    return sum(w * (f[k] / (r[k] + EPS) - 1.0) for k, w in weights.items() if w != 0.0)


def _power_ratio(get, layer, modalities):
    """sum over ``modalities`` of mean a^2 on forget over mean a^2 on retain (rms^2 = mean a^2)."""
    return sum(get(layer, "forget", m)["rms"] ** 2 / (get(layer, "retain", m)["rms"] ** 2 + EPS) for m in modalities)


def cross_modal_terms(m: dict, t: dict) -> dict[str, torch.Tensor]:
    """manu-paper's four importance terms of one layer and split from its multimodal (``m``) and text (``t``)
    metrics (``stats.metrics`` dicts): I_abs, I_freq, I_var, I_rms (docs/SELECTION.md)."""
    z2m, z2t = m["rms"] ** 2, t["rms"] ** 2  # mean a^2: a raw sum would grow with each modality's token count
    return {"abs": (m["abs"] - t["abs"]).abs() / (m["abs"] + t["abs"] + EPS),
            "freq": (m["freq"] - t["freq"]).abs() / (m["freq"] + t["freq"] + EPS),
            "var": (m["var"] + t["var"]).sqrt(),
            "rms": ((z2m - z2t).abs() / (z2m + z2t + EPS)).sqrt()}


def _cross_modal_importance(get, layer, split):
    return sum(cross_modal_terms(get(layer, split, "multimodal"), get(layer, split, "text")).values())


def _check_options(strategy, metric, modality, weights):
    _check_strategy(strategy)
    if metric is not None and strategy != "selective-pruning":
        raise ValueError(f"metric applies to selective-pruning only, not {strategy!r}")
    if metric is not None and metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    if modality is not None and strategy != "selective-pruning":
        raise ValueError(f"modality applies to selective-pruning only ({strategy!r} chooses it per tower or uses both)")
    if modality is not None and modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
    if weights is not None:
        if strategy != "manu-code":
            raise ValueError(f"weights apply to manu-code only, not {strategy!r}")
        bad = set(weights) - set(METRICS)
        if bad:
            raise ValueError(f"unknown metric weights {sorted(bad)}; expected keys among {METRICS}")


def scores(stats: NeuronStats, strategy: str = "manu-code", *, site: str = "hidden", metric: str | None = None,
           modality: str | None = None, token_kinds=None, towers=None, seed: int = 0,
           weights: dict | None = None) -> dict[str, torch.Tensor]:
    """Per-neuron scores (float64, higher = prune first) of every considered layer, in natural layer order."""
    if not isinstance(stats, NeuronStats):
        raise TypeError(f"stats must be a manu_fast.stats.NeuronStats (NeuronStats.load(path)), got {type(stats).__name__}")
    _check_options(strategy, metric, modality, weights)
    if strategy == "selective-pruning":
        modality = modality or "text"
        metric = metric or "freq"
    towers = default_towers(stats, strategy, modality, site) if towers is None else tuple(towers)
    layers = considered_layers(stats, site, towers)
    if strategy == "random":
        gen = torch.Generator().manual_seed(seed)
        return {n: torch.rand(stats.block(n, site).shape[-1], generator=gen, dtype=torch.float64) for n in layers}
    get = _Metrics(stats, site, token_kinds)
    out = {}
    for n in layers:
        if strategy == "manu-code":
            mod = "multimodal" if _tower(stats, n) in IMAGE_TOWERS else "text"
            s = _manu_code(get, n, mod, MANU_CODE_WEIGHTS if weights is None else weights)
        elif strategy == "power-ratio":
            s = _power_ratio(get, n, ("multimodal",) if _tower(stats, n) in IMAGE_TOWERS else MODALITIES)
        elif strategy == "manu-paper":
            s = _cross_modal_importance(get, n, "forget") / (_cross_modal_importance(get, n, "retain") + EPS)
        else:
            s = get(n, "forget", modality)[metric] / (get(n, "retain", modality)[metric] + EPS)
        out[n] = s.cpu()
    return out


def top_k_count(alpha: float, n: int) -> int:
    return int(math.floor(alpha / 100.0 * n + 0.5))


def check_alpha(alpha):
    """A percentage in (0, 100), or a mapping from tower names and layer names (fnmatch patterns) to percentages."""
    if isinstance(alpha, Mapping):
        if not alpha:
            raise ValueError(f"an alpha mapping needs at least one tower ({', '.join(TOWERS)}) or layer name")
        return {str(key): check_alpha(a) for key, a in alpha.items()}
    alpha = float(alpha)
    if not 0.0 < alpha < 100.0:
        raise ValueError(f"alpha is a percentage in (0, 100), got {alpha}")
    return alpha


def _select_in_pool(score: dict[str, torch.Tensor], alive: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Indices of the k best alive neurons of one pool (layers in order), per layer. Deterministic ties."""
    layers = list(score)
    flat = torch.cat([score[n] for n in layers])
    owner = torch.cat([torch.full((score[n].numel(),), i) for i, n in enumerate(layers)])
    local = torch.cat([torch.arange(score[n].numel()) for n in layers])
    cand = torch.cat([alive[n] for n in layers]).nonzero().flatten()
    if k > cand.numel():
        raise ValueError(f"asked to prune {k} neurons of layers {layers[0]}..{layers[-1]}, only {cand.numel()} are alive")
    if bool(torch.isnan(flat[cand]).any()):
        raise ValueError(f"NaN scores in layers {layers[0]}..{layers[-1]}: the statistics are damaged")
    # stable sort of a pool laid out in (layer order, index) order: equal scores keep that order
    order = torch.sort(flat[cand], descending=True, stable=True).indices[:k]
    chosen = cand[order]
    return {n: local[chosen[owner[chosen] == i]] for i, n in enumerate(layers)}


def _pools(layers, towers_of, alpha, by_tower: bool) -> list[tuple[list[str], float]]:
    """(layers of one top-k pool, its alpha) for a scalar or mapping ``alpha`` (rules: module docstring)."""
    if not isinstance(alpha, dict):
        if by_tower:
            return [([n for n in layers if towers_of[n] == t], alpha) for t in dict.fromkeys(towers_of.values())]
        return [(list(layers), alpha)]
    owner = {}
    for key in alpha:
        if key in TOWERS:
            continue
        matched = [n for n in layers if fnmatch.fnmatchcase(n, key)]
        if not matched:
            raise ValueError(f"alpha key {key!r} is no tower ({', '.join(TOWERS)}) and matches no scored layer "
                             f"(they are named like {layers[0]!r})")
        for n in matched:
            if n in owner:
                raise ValueError(f"layer {n!r} matches two alpha keys, {owner[n]!r} and {key!r}")
            owner[n] = key
    pools = [([n], alpha[owner[n]]) for n in layers if n in owner]
    for tower in dict.fromkeys(towers_of.values()):
        rest = [n for n in layers if towers_of[n] == tower and n not in owner]
        if tower in alpha and rest:
            pools.append((rest, alpha[tower]))
    return pools


def _alive_keep(stats, site, alive: Masks | None, layers) -> dict[str, torch.Tensor]:
    if alive is None:
        return {n: torch.ones(stats.block(n, site).shape[-1], dtype=torch.bool) for n in layers}
    from .stats import check_fingerprint
    check_fingerprint(stats.fingerprint, alive.fingerprint)
    if alive.site != site:
        raise ValueError(f"alive masks are for site {alive.site!r}, selection is at site {site!r}")
    return {n: alive.keep[n] if n in alive.keep else torch.ones(stats.block(n, site).shape[-1], dtype=torch.bool)
            for n in layers}


def select_neurons(stats: NeuronStats, strategy: str = "manu-code", alpha: float | Mapping[str, float] = 2.0, *,
                   per_layer: bool = False,
                   site: str = "hidden", metric: str | None = None, modality: str | None = None, token_kinds=None,
                   towers=None, alive: Masks | None = None, seed: int = 0, weights: dict | None = None) -> Masks:
    """Masks pruning the top ``alpha`` % neurons by ``scores(...)`` (see the module docstring for the rules).

    ``alpha`` may be a mapping, e.g. ``{"vision": 10, "projector": 10, "language": 30}`` (top-k per tower, each with
    its own fraction) or ``{"vision": 10, "*language_model.layers.1.mlp": 50}`` (a per-layer budget: that layer is
    its own pool; language-model layers named nowhere are not pruned). Towers the strategy does not score are
    ignored; a layer key that matches no scored layer is an error. ``per_layer`` splits every pool into its layers.

    With ``alive`` (iterative rounds), only neurons it keeps are candidates and the result is cumulative:
    it prunes what ``alive`` prunes plus the new selection.

    ``"manu-official"`` takes the OfficialStats of ``profile(..., statistics="official")`` and one percentage, and
    returns masks of site ``"linear"`` (``manu_fast.official.select_official``); the other options do not apply.
    """
    if strategy == "manu-official" or isinstance(stats, OfficialStats):
        if strategy != "manu-official" or not isinstance(stats, OfficialStats):
            raise ValueError("manu-official selects from the official statistics (profile(..., statistics='official'), "
                             "`manu-fast profile --official`) and those statistics serve manu-official only; got "
                             f"strategy {strategy!r} on {type(stats).__name__}")
        given = [n for n, v in (("per_layer", per_layer), ("site", site != "hidden"), ("metric", metric),
                                ("modality", modality), ("token_kinds", token_kinds), ("towers", towers),
                                ("alive", alive), ("weights", weights)) if v]
        if given:
            raise ValueError(f"manu-official fixes its sites, towers and weights; {', '.join(given)} do not apply")
        return select_official(stats, alpha)
    alpha = check_alpha(alpha)
    sc = scores(stats, strategy, site=site, metric=metric, modality=modality, token_kinds=token_kinds,
                towers=towers, seed=seed, weights=weights)
    keep = _alive_keep(stats, site, alive, sc)
    towers_of = {n: _tower(stats, n) for n in sc}
    new_keep = {n: k.clone() for n, k in keep.items()}
    pools = _pools(list(sc), towers_of, alpha, by_tower=strategy in ("manu-code", "power-ratio", "random"))
    if per_layer:
        pools = [([n], a) for pool, a in pools for n in pool]
    for pool, pool_alpha in pools:
        total = sum(sc[n].numel() for n in pool)
        chosen = _select_in_pool({n: sc[n] for n in pool}, {n: keep[n] for n in pool}, top_k_count(pool_alpha, total))
        for n, idx in chosen.items():
            new_keep[n][idx] = False
    if alive is not None:
        new_keep = {**alive.keep, **new_keep}
    description = {"strategy": strategy, "alpha": alpha, "per_layer": per_layer, "site": site, "metric": metric,
                   "modality": modality, "token_kinds": token_kinds, "towers": sorted(set(towers_of.values())),
                   "seed": seed if strategy == "random" else None, "weights": weights, "tau": stats.tau,
                   "groups": stats.groups, "previous": alive.description if alive is not None else None}
    return Masks(new_keep, stats.fingerprint, site, description)


def random_like(masks: Masks, seed: int = 0, per_layer: bool = False) -> Masks:
    """The random control of ``masks``: the same number of pruned neurons per tower (or, with ``per_layer``, per
    layer), chosen uniformly."""
    gen = torch.Generator().manual_seed(seed)
    layers = sorted(masks.keep, key=natural_key)
    keep = {n: torch.ones_like(masks.keep[n]) for n in layers}
    groups = [[n] for n in layers] if per_layer else \
        [[n for n in layers if masks.tower(n) == t] for t in dict.fromkeys(masks.tower(n) for n in layers)]
    for pool in groups:
        sc = {n: torch.rand(masks.keep[n].numel(), generator=gen, dtype=torch.float64) for n in pool}
        count = sum(int((~masks.keep[n]).sum()) for n in pool)
        chosen = _select_in_pool(sc, {n: keep[n] for n in pool}, count)
        for n, idx in chosen.items():
            keep[n][idx] = False
    return Masks(keep, masks.fingerprint, masks.site,
                 {"strategy": "random", "like": masks.description, "seed": seed, "per_layer": per_layer})
