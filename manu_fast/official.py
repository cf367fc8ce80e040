"""MANU as its authors' code runs it: the official statistics, score and top-k (``manu-official``).

This module reimplements, from their description in docs/SELECTION.md ("manu-official"), what the official MANU
code (franciscoliu/MANU, ``prune/prune_incremental.py`` driving ``prune/prune_utility.py``) computes, so that its
selection can be reproduced on any model manu_fast supports:

- **sites**: the outputs of the MLP Linears, every row a unit: fc1 and fc2 (plain MLPs, the vision tower), gate,
  up and down projection (gated MLPs, the language model); the projector is not profiled;
- **data**: the vision tower on multimodal batches, the language model on text-only batches;
- **statistics per position**: each Linear output (S, L, D) of a batch is clamped to [-1e3, 1e3] and reduced over
  its S samples at each of its L positions: mean |a|, share of |a| > 0.1, the unbiased std and sqrt(mean a^2), each
  (L, D); a chunk of 10 batches averages the rows of its batches (every position of every batch, padding
  included); the result is the mean over chunks;
- **layers** (``official_layers``): ``"as-run"``, the code as it runs: every layer of a tower is hooked under the
  same names, so a name's samples at a position are samples x layers, and the units chosen are pruned in the last
  three layers of the tower only, the same rows in each (the code's names ``*_21..23`` / ``*_29..31`` on
  LLaVA-1.5); ``"per-layer"``, the code's commented-out intent: one name per layer, every layer pruned;
- **score and top-k** (``select_official``): ``sum_k w_k (F_k / (R_k + 1e-5) - 1)`` with ``w = {abs: 2, freq: 0,
  std: 2, rms: 2}``; per tower, ``k = int(p / 100 * n)`` over all its units (as-run: each unit once per pruned
  layer, like the code's identical copies) and every unit scoring at least the k-th best is pruned (ties prune
  more than k).

Memory: one batch's per-position statistics, O(L x D) per (layer, site) (as-run: per (tower, site), the layers
merged into them as they run), are reduced to O(D) chunk sums when the batch ends; nothing grows with the data.
The statistics are float64 (the official code: float32 from the model's fp16 activations).
"""
from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters import fingerprint, forward_kwargs, patch_model
from .io import load_tensors, save_tensors
from .masks import Masks, row_key
from .schema import OFFICIAL_LAYERS, StatsFileError, check_fingerprint, data_key

FORMAT = "manu_fast.official_stats/1"
CLAMP = 1e3          # activations are clamped to [-CLAMP, CLAMP] before any statistic
TAU = 0.1            # the frequency metric's threshold, |a| > TAU
CHUNK = 10           # batches per chunk (chunk_size of collect_feedforward_activations)
LAST_LAYERS = 3      # as-run: the layers pruned, at the end of each tower (LLaVA-1.5: vision 21-23, language 29-31)
EPS = 1e-5
METRIC_ORDER = ("abs", "freq", "std", "rms")  # I_abs, I_freq, I_var (a std), I_rms: the order the score sums them
WEIGHTS = {"abs": 2.0, "freq": 0.0, "std": 2.0, "rms": 2.0}
TOWER_MODALITY = {"vision": "multimodal", "language": "text"}  # which data each profiled tower is scored on


def _unit_sites(kind: str, name: str) -> tuple[str, ...]:
    """The Linear-output sites of one MLP: plain fc1 -> 'pre', fc2 -> 'out'; gated gate/up/down -> 'pre'/'up'/'out'."""
    if kind == "plain":
        return ("pre", "out")
    if kind == "gated":
        return ("pre", "up", "out")
    raise ValueError(f"manu-official profiles separate fc1/fc2 or gate/up/down Linears; {name} is a {kind!r} MLP "
                     "(one Linear computes gate and up)")


@dataclass
class OfficialStats:
    """Statistics of the official MANU code: ``values[f"{split}/{source}::{site}/{metric}"]`` is a float64 (D,)
    vector. A ``source`` is a tower (``layers == "as-run"``: every layer pooled) or a layer name (``"per-layer"``);
    ``sources[source]`` holds its tower, sites and the layers its units are pruned in (``targets``)."""

    layers: str
    fingerprint: dict
    sources: dict[str, dict]
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    batches: dict[str, int] = field(default_factory=dict)

    @staticmethod
    def key(split: str, source: str, site: str, metric: str) -> str:
        return f"{split}/{source}::{site}/{metric}"

    def metric(self, split: str, source: str, site: str, metric: str) -> torch.Tensor:
        key = self.key(split, source, site, metric)
        if key not in self.values:
            tower = self.sources[source]["tower"]
            raise ValueError(f"the official statistics have no {split} data for {source}::{site}: profile "
                             f"{split}/{TOWER_MODALITY[tower]} batches (the {tower} tower is scored on them)")
        return self.values[key]

    def metadata(self) -> dict[str, str]:
        return {"format": FORMAT, "official_layers": self.layers, "sources": json.dumps(self.sources, sort_keys=True),
                "batches": json.dumps(self.batches, sort_keys=True),
                "fingerprint": json.dumps(self.fingerprint, sort_keys=True)}

    def save(self, path) -> None:
        """Write to ``path`` atomically in safetensors (with a checksum, like every manu_fast file)."""
        save_tensors({k: v.detach().cpu().contiguous() for k, v in self.values.items()}, path, self.metadata())

    @classmethod
    def load(cls, path, expect_fingerprint: dict | None = None) -> "OfficialStats":
        tensors, meta = load_tensors(path, FORMAT, "official statistics")
        try:
            layers, sources = meta["official_layers"], json.loads(meta["sources"])
            batches, fp = json.loads(meta["batches"]), json.loads(meta["fingerprint"])
        except (KeyError, ValueError) as e:
            raise StatsFileError(f"{path}: official statistics metadata is damaged ({e})") from None
        if layers not in OFFICIAL_LAYERS:
            raise StatsFileError(f"{path}: unknown official_layers {layers!r}")
        for k, v in tensors.items():
            source = k.split("/", 1)[-1].partition("::")[0]
            if source not in sources or v.dtype != torch.float64 or v.dim() != 1:
                raise StatsFileError(f"{path}: entry {k!r} does not fit the file's own header")
        if expect_fingerprint is not None:
            check_fingerprint(expect_fingerprint, fp, path)
        return cls(layers, fp, sources, tensors, batches)


class _PositionStats:
    """One batch's per-position statistics of one source and site, over its samples (as-run: samples x layers,
    merged as the layers run: Chan's update for the std), then reduced to the chunk's per-neuron sums."""

    def __init__(self, calls_per_batch: int):
        self.calls_per_batch = calls_per_batch
        self.chunk = None            # {metric: (D,) sum over the chunk's positions}
        self.chunk_positions = 0
        self.total = None            # {metric: (D,) sum of chunk means}
        self.chunks = 0
        self._reset_batch()

    def _reset_batch(self):
        self.calls, self.n, self.mean, self.m2, self.sums = 0, 0, None, None, None

    def add(self, a: torch.Tensor) -> None:
        x = a.detach().to(torch.float64).clamp(-CLAMP, CLAMP)
        if x.dim() == 2:  # (L, D) without a batch axis: one sample
            x = x.unsqueeze(0)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        b = x.shape[0]
        mean_b = x.mean(0)
        m2_b = (x - mean_b).square().sum(0)
        ax = x.abs()
        sums = {"abs": ax.sum(0), "freq": (ax > TAU).sum(0, dtype=torch.float64), "rms": x.square().sum(0)}
        if self.calls == 0:
            self.n, self.mean, self.m2, self.sums = b, mean_b, m2_b, sums
        else:
            if mean_b.shape != self.mean.shape:
                raise ValueError(f"the pooled layers of one tower gave outputs of {tuple(self.mean.shape)} and "
                                 f"{tuple(mean_b.shape)} positions x units in one batch")
            n = self.n + b
            delta = mean_b - self.mean
            self.mean = self.mean + delta * (b / n)
            self.m2 = self.m2 + m2_b + delta.square() * (self.n * b / n)
            self.n = n
            for k, v in sums.items():
                self.sums[k] = self.sums[k] + v
        self.calls += 1
        if self.calls == self.calls_per_batch:
            self._end_batch()

    def _end_batch(self) -> None:
        if self.n < 2:
            raise ValueError("the official statistics take the unbiased std over the samples of a batch at each "
                             f"position: a batch of {self.n} sample has none (per-layer needs batches of >= 2)")
        per_position = {"abs": self.sums["abs"] / self.n, "freq": self.sums["freq"] / self.n,
                        "std": (self.m2 / (self.n - 1)).sqrt(), "rms": (self.sums["rms"] / self.n).sqrt()}
        sums = {k: v.sum(0) for k, v in per_position.items()}
        if self.chunk is None:
            self.chunk = sums
        else:
            self.chunk = {k: self.chunk[k] + v for k, v in sums.items()}
        self.chunk_positions += self.mean.shape[0]
        self._reset_batch()

    def check_batch_done(self, where: str) -> None:
        if self.calls:
            raise RuntimeError(f"{where}: {self.calls} of the {self.calls_per_batch} pooled layers ran in a batch; "
                               "as-run statistics need every layer of the tower in every batch")

    def end_chunk(self) -> None:
        if self.chunk is None:
            return
        means = {k: v / self.chunk_positions for k, v in self.chunk.items()}
        self.total = means if self.total is None else {k: self.total[k] + v for k, v in means.items()}
        self.chunks += 1
        self.chunk, self.chunk_positions = None, 0

    def result(self) -> dict[str, torch.Tensor] | None:
        return None if self.total is None else {k: (v / self.chunks).cpu() for k, v in self.total.items()}


def _sources(patch, official_layers: str) -> tuple[dict[str, dict], dict[str, tuple[str, str]]]:
    """(sources, {layer: (tower, source)}) of the towers the official code profiles, in the model's layer order."""
    by_tower: dict[str, list[str]] = {}
    for name, tower in patch.towers.items():
        if tower in TOWER_MODALITY:
            by_tower.setdefault(tower, []).append(name)
    if not by_tower:
        raise ValueError("manu-official profiles the vision tower and the language model; this model has neither "
                         f"(towers: {sorted(set(patch.towers.values()))})")
    sources, owner = {}, {}
    for tower, names in by_tower.items():
        sites = {_unit_sites(patch.layers[n].kind, n) for n in names}
        if len(sites) > 1:
            raise ValueError(f"manu-official pools the {tower} tower's layers by site, but its MLPs mix kinds {sites}")
        sites = list(next(iter(sites)))
        if official_layers == "as-run":
            sources[tower] = {"tower": tower, "sites": sites, "targets": names[-LAST_LAYERS:], "pooled": len(names)}
            owner.update({n: (tower, tower) for n in names})
        else:
            for n in names:
                sources[n] = {"tower": tower, "sites": sites, "targets": [n], "pooled": 1}
                owner[n] = (tower, n)
    return sources, owner


def _linear_of(layer, site: str) -> nn.Module:
    return layer.out_linear if site == "out" else layer.in_linears[0 if site == "pre" else 1]


def profile_official(model: nn.Module, data: Mapping[tuple[str, str], Iterable[dict]], *,
                     official_layers: str = "as-run", progress: bool = True) -> OfficialStats:
    """The official MANU code's statistics of ``model`` over ``data`` ({(split, modality): batches of model
    kwargs}), batch by batch in the order given; ``profile(..., statistics="official")`` calls this.

    Every position of a batch is profiled (padding too, as the official code does); a batch's ``profile_mask`` is
    not used. Give the retain data as many batches as the forget data to match the official driver (it profiles
    retain on that many batches of a shuffled loader; the CLI's ``profile --official`` does this)."""
    from tqdm.auto import tqdm
    if official_layers not in OFFICIAL_LAYERS:
        raise ValueError(f"official_layers must be one of {OFFICIAL_LAYERS}, got {official_layers!r}")
    if not data:
        raise ValueError("no data to profile: give at least one (split, modality) -> batches entry")
    patch = patch_model(model)
    sources, owner = _sources(patch, official_layers)
    current = {"modality": None}
    accs: dict[tuple[str, str, str], _PositionStats] = {}
    handles = []

    def hook_for(tower, source, site):
        def hook(module, args, out):
            if current["modality"] == TOWER_MODALITY[tower]:
                accs[(current["split"], source, site)].add(out)
        return hook

    extra = forward_kwargs(model)
    batches = {}
    was_training = model.training
    model.eval()
    try:
        for name, (tower, source) in owner.items():
            for site in sources[source]["sites"]:
                handles.append(_linear_of(patch.layers[name], site).register_forward_hook(hook_for(tower, source, site)))
        with torch.no_grad():
            for (split, modality), items in data.items():
                key = data_key(split, modality)
                if key in batches:
                    raise ValueError(f"{key} is given twice")
                mine = [(split, s, site) for s, info in sources.items() if TOWER_MODALITY[info["tower"]] == modality
                        for site in info["sites"]]
                for k in mine:
                    if k not in accs:
                        accs[k] = _PositionStats(sources[k[1]]["pooled"])
                current.update(split=split, modality=modality)
                seen = 0
                for batch in tqdm(items, desc=f"official {key}", disable=not progress, leave=False):
                    batch = {k: v for k, v in dict(batch).items() if k != "profile_mask"}
                    model(**batch, **extra)
                    seen += 1
                    for k in mine:
                        accs[k].check_batch_done(f"{k[1]}::{k[2]}")
                    if seen % CHUNK == 0:
                        for k in mine:
                            accs[k].end_chunk()
                for k in mine:
                    accs[k].end_chunk()
                if not seen:
                    raise ValueError(f"the {key} data yielded no batch: nothing to profile")
                batches[key] = seen
    finally:
        for h in handles:
            h.remove()
        current["modality"] = None
        model.train(was_training)
    values = {}
    for (split, source, site), acc in accs.items():
        result = acc.result()
        if result is not None:
            values.update({OfficialStats.key(split, source, site, m): v for m, v in result.items()})
    return OfficialStats(official_layers, fingerprint(model), sources, values, batches)


def official_scores(stats: OfficialStats) -> dict[tuple[str, str], torch.Tensor]:
    """{(source, site): float64 score per unit}, ``sum_k w_k (F_k / (R_k + eps) - 1)`` summed in METRIC_ORDER."""
    out = {}
    for source, info in stats.sources.items():
        for site in info["sites"]:
            score = None
            for m in METRIC_ORDER:
                f, r = stats.metric("forget", source, site, m), stats.metric("retain", source, site, m)
                term = WEIGHTS[m] * (f / (r + EPS) - 1.0)
                score = term if score is None else score + term
            out[(source, site)] = score
    return out


def select_official(stats: OfficialStats, alpha: float) -> Masks:
    """Masks (site ``"linear"``: Linear output rows) of the official top-k: per tower, k = int(alpha / 100 * n) over
    its n units (as-run: each once per pruned layer), every unit scoring >= the k-th best pruned, in the layers the
    code prunes. k = 0 prunes nothing in that tower, with a warning (the official code crashes there)."""
    if isinstance(alpha, Mapping) or isinstance(alpha, bool):
        raise ValueError("manu-official takes one percentage for every tower (the official prune_percent)")
    alpha = float(alpha)
    if not 0.0 < alpha <= 100.0:
        raise ValueError(f"alpha is a percentage in (0, 100], got {alpha}")
    sc = official_scores(stats)
    keep, counts = {}, {}
    for tower in dict.fromkeys(info["tower"] for info in stats.sources.values()):
        entries = [(src, site) for (src, site) in sc if stats.sources[src]["tower"] == tower]
        copies = [sc[e] for e in entries for _ in stats.sources[e[0]]["targets"]]
        flat = torch.cat(copies)
        if bool(torch.isnan(flat).any()):
            raise ValueError(f"NaN scores in the {tower} tower: the official statistics are damaged")
        k = int((alpha / 100) * flat.numel())
        if k == 0:
            warnings.warn(f"manu-official: alpha {alpha} % of the {flat.numel()} {tower} units is k = 0, so nothing is "
                          "pruned there (the official code's torch.topk(scores, 0) would crash)", stacklevel=2)
            counts[tower] = {"k": 0, "pruned": 0, "units": flat.numel()}
            continue
        threshold = torch.topk(flat, k).values[-1]
        pruned = 0
        for src, site in entries:
            drop = sc[(src, site)] >= threshold
            for layer in stats.sources[src]["targets"]:
                keep[row_key(layer, site)] = ~drop
                pruned += int(drop.sum())
        counts[tower] = {"k": k, "pruned": pruned, "units": flat.numel(), "threshold": float(threshold)}
    description = {"strategy": "manu-official", "alpha": alpha, "official_layers": stats.layers, "towers": counts,
                   "batches": stats.batches}
    return Masks(keep, stats.fingerprint, "linear", description)


def official_prompt(question: str, answer: str, multimodal: bool) -> str:
    """The official code's training-style prompt (data_process/data_preprocess.py), question and answer included."""
    return f"USER: <image>\n{question}\nASSISTANT: {answer}" if multimodal else f"USER:{question}\nASSISTANT: {answer}"


def official_batches(items: list, batch_size: int, *, limit: int | None = None, seed: int = 0) -> list[list]:
    """The batches (lists of ``items``) the official driver forwards from one shuffled DataLoader: chunk c (batches
    10c .. 10c+9) comes from a fresh shuffle (the driver iterates the loader anew for every chunk); ``limit``
    batches in all (retain: as many as the forget data has), default every batch of one pass."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    per_pass = math.ceil(len(items) / batch_size)
    total = per_pass if limit is None else min(limit, per_pass)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, total, CHUNK):
        order = torch.randperm(len(items), generator=gen).tolist()
        passes = [[items[i] for i in order[b * batch_size:(b + 1) * batch_size]] for b in range(per_pass)]
        out.extend(passes[start:min(start + CHUNK, total)])
    return out
