"""Per-neuron, per-group sufficient statistics and their exact merge.

One statistics block is a float64 tensor of shape ``(NUM_FIELDS, G, N)`` (G token groups, N neurons)
whose rows are FIELDS. ``count`` counts the finite values seen, ``mean``/``m2`` are the running mean and
sum of squared deviations (merged with Chan's formula, so the variance stays accurate when
|mean| >> std), ``nonfinite`` counts NaN/Inf values, which are excluded from every other field.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from .io import check_fingerprint_fields, check_moments, load_tensors, parse_json, save_tensors
from .schema import (DEFAULT_TAU, FIELDS, NUM_FIELDS, FIELD_INDEX, StatsFileError, check_fingerprint, group_label,  # noqa: F401
                     site_length)

FORMAT = "manu_fast.stats/1"
MAX_GROUPS = 4096  # group labels a statistics file may hold (the CLI makes at most 2 splits x 2 modalities x 5 kinds)


def empty_stats(num_groups: int, num_neurons: int, device=None) -> torch.Tensor:
    return torch.zeros(NUM_FIELDS, num_groups, num_neurons, dtype=torch.float64, device=device)


def segment_stats_reference(a: torch.Tensor, group_ids: torch.Tensor, num_groups: int, tau: float) -> torch.Tensor:
    """Statistics of ``a`` (T, N) for each group, in float64, two-pass: the oracle every backend is tested against."""
    a = a.to(torch.float64)
    out = empty_stats(num_groups, a.shape[1], a.device)
    gid = group_ids.reshape(-1).to(a.device)
    for k in range(num_groups):
        x = a[gid == k]
        finite = torch.isfinite(x)
        n = finite.sum(0, dtype=torch.float64)
        x0 = torch.where(finite, x, 0.0)
        mean = torch.where(n > 0, x0.sum(0) / n.clamp(min=1), 0.0)
        dev = torch.where(finite, x - mean, 0.0)
        out[FIELD_INDEX["count"], k] = n
        out[FIELD_INDEX["mean"], k] = mean
        out[FIELD_INDEX["m2"], k] = (dev * dev).sum(0)
        out[FIELD_INDEX["sum_abs"], k] = x0.abs().sum(0)
        out[FIELD_INDEX["sum_sq"], k] = (x0 * x0).sum(0)
        out[FIELD_INDEX["active"], k] = (x0.abs() > tau).sum(0, dtype=torch.float64)
        out[FIELD_INDEX["nonfinite"], k] = (~finite).sum(0, dtype=torch.float64)
    return out


def merge_partials(parts: torch.Tensor) -> torch.Tensor:
    """Merge C partial blocks (C, NUM_FIELDS, G, N) into one (NUM_FIELDS, G, N), exactly, in float64.

    Uses the parallel form of Chan's update: mean = sum n_i m_i / n, M2 = sum M2_i + sum n_i (m_i - mean)^2.
    Deterministic: a fixed-order reduction over the leading axis.
    """
    p = parts.to(torch.float64)
    n_i = p[:, FIELD_INDEX["count"]]
    n = n_i.sum(0)
    mean = torch.where(n > 0, (n_i * p[:, FIELD_INDEX["mean"]]).sum(0) / n.clamp(min=1), 0.0)
    d = p[:, FIELD_INDEX["mean"]] - mean
    out = p.sum(0)
    out[FIELD_INDEX["mean"]] = mean
    out[FIELD_INDEX["m2"]] = p[:, FIELD_INDEX["m2"]].sum(0) + (n_i * d * d).sum(0)
    return out


def merge_into(acc: torch.Tensor, parts: torch.Tensor) -> torch.Tensor:
    """acc <- merge(acc, parts), in place (acc is float64); ``parts`` is one block (NUM_FIELDS, G, N) or a stack
    of C blocks (C, NUM_FIELDS, G, N), merged after ``acc`` in order."""
    parts = parts.to(acc.device, torch.float64)
    if parts.dim() == acc.dim():
        parts = parts.unsqueeze(0)
    acc.copy_(merge_partials(torch.cat([acc.unsqueeze(0), parts])))
    return acc


def pool_groups(block: torch.Tensor, groups) -> torch.Tensor:
    """Pool several groups of one block (NUM_FIELDS, G, N) into a single (NUM_FIELDS, N) block."""
    idx = torch.as_tensor(list(groups), dtype=torch.long, device=block.device)
    return merge_partials(block[:, idx].permute(1, 0, 2).unsqueeze(2)).squeeze(1)


def metrics(block: torch.Tensor) -> dict[str, torch.Tensor]:
    """Derived per-neuron metrics of a pooled block (NUM_FIELDS, ..., N). Empty groups give NaN."""
    n = block[FIELD_INDEX["count"]]
    nan = torch.full_like(n, float("nan"))
    safe = n.clamp(min=1)
    var = torch.where(n > 0, block[FIELD_INDEX["m2"]] / safe, nan)  # population variance
    return {
        "count": n,
        "mean": torch.where(n > 0, block[FIELD_INDEX["mean"]], nan),
        "abs": torch.where(n > 0, block[FIELD_INDEX["sum_abs"]] / safe, nan),
        "freq": torch.where(n > 0, block[FIELD_INDEX["active"]] / safe, nan),
        "var": var,
        "std": var.sqrt(),
        "rms": torch.where(n > 0, (block[FIELD_INDEX["sum_sq"]] / safe).sqrt(), nan),
        "sum_sq": block[FIELD_INDEX["sum_sq"]],
    }


@dataclass
class NeuronStats:
    """Statistics of every profiled (layer, site): ``blocks[f"{layer}::{site}"]`` is (NUM_FIELDS, G, N) float64.

    ``groups`` are the labels of the group ids (e.g. ``forget/multimodal/image``); ``fingerprint`` describes
    the model the statistics came from (see ``manu_fast.adapters.fingerprint``).
    """

    groups: list[str]
    fingerprint: dict
    tau: float = DEFAULT_TAU
    blocks: dict[str, torch.Tensor] = field(default_factory=dict)

    @staticmethod
    def key(layer: str, site: str) -> str:
        return f"{layer}::{site}"

    def block(self, layer: str, site: str = "hidden") -> torch.Tensor:
        return self.blocks[self.key(layer, site)]

    def layers(self, site: str = "hidden") -> list[str]:
        suffix = f"::{site}"
        return [k[: -len(suffix)] for k in self.blocks if k.endswith(suffix)]

    def group_ids(self, split=None, modality=None, kind=None) -> list[int]:
        """Ids of the groups matching ``split``/``modality``/``kind`` (None matches any; ``kind`` may be a list)."""
        kinds = None if kind is None else {kind} if isinstance(kind, str) else set(kind)
        out = []
        for i, label in enumerate(self.groups):
            s, m, k = label.split("/")
            if split in (None, s) and modality in (None, m) and (kinds is None or k in kinds):
                out.append(i)
        return out

    def pooled(self, layer: str, site: str, groups) -> dict[str, torch.Tensor]:
        """Metrics of one (layer, site) pooled over the given group ids."""
        return metrics(pool_groups(self.block(layer, site), groups))

    def to(self, device) -> "NeuronStats":
        return NeuronStats(list(self.groups), self.fingerprint, self.tau, {k: v.to(device) for k, v in self.blocks.items()})

    def merge(self, other: "NeuronStats") -> "NeuronStats":
        """Exact merge of two statistics of the same model, groups and tau (e.g. two shards)."""
        if other.groups != self.groups or other.tau != self.tau:
            raise ValueError("cannot merge statistics with different groups or tau")
        check_fingerprint(self.fingerprint, other.fingerprint)
        if set(other.blocks) != set(self.blocks):
            raise ValueError("cannot merge statistics of different layers/sites")
        for k, v in other.blocks.items():
            merge_into(self.blocks[k], v)
        return self

    def metadata(self) -> dict[str, str]:
        return {"format": FORMAT, "groups": json.dumps(self.groups), "tau": repr(float(self.tau)),
                "fingerprint": json.dumps(self.fingerprint, sort_keys=True)}

    def save(self, path, extra_metadata: dict[str, str] | None = None) -> None:
        """Write to ``path`` atomically (temp file + rename) in safetensors, with ``extra_metadata`` entries."""
        meta = {**self.metadata(), **(extra_metadata or {})}
        save_tensors({k: v.detach().cpu().contiguous() for k, v in self.blocks.items()}, path, meta)

    @classmethod
    def load(cls, path, expect_fingerprint: dict | None = None) -> "NeuronStats":
        tensors, meta = load_tensors(path, FORMAT, "statistics")
        groups = parse_json(meta.get("groups"), path, "groups")
        if not isinstance(groups, list) or not groups or len(groups) > MAX_GROUPS or len(set(map(str, groups))) != len(groups) \
                or not all(isinstance(g, str) and len(g.split("/")) == 3 and all(g.split("/")) for g in groups):
            raise StatsFileError(f"{path}: metadata field 'groups' must be a list of 1 to {MAX_GROUPS} distinct labels "
                                 "split/modality/kind")
        fp = check_fingerprint_fields(parse_json(meta.get("fingerprint"), path, "fingerprint"), path)
        try:
            tau = float(meta["tau"])
        except (KeyError, ValueError) as e:
            raise StatsFileError(f"{path}: metadata field 'tau' is missing or not a number ({e})") from None
        if not 0 <= tau < float("inf"):
            raise StatsFileError(f"{path}: metadata field 'tau' must be finite and non-negative, got {tau}")
        for k, v in tensors.items():
            layer, _, site = k.partition("::")
            try:
                width = site_length(fp.get("layers", {})[layer], site)
            except (KeyError, ValueError, TypeError, AttributeError) as e:
                raise StatsFileError(f"{path}: block {k!r} is no site of a layer in the file's own fingerprint ({e})") from None
            if v.dtype != torch.float64 or v.shape != (NUM_FIELDS, len(groups), width):
                raise StatsFileError(f"{path}: block {k!r} has shape {tuple(v.shape)}/{v.dtype}, inconsistent with the "
                                     f"file's own header ({NUM_FIELDS}, {len(groups)}, {width})/torch.float64")
            check_moments(v, path, k)
        if expect_fingerprint is not None:
            check_fingerprint(expect_fingerprint, fp, path)
        return cls(groups, fp, tau, tensors)
