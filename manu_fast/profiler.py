"""Profiling: run a model over forget/retain data in each modality, gathering statistics inside the fused MLPs.

Each batch is homogeneous in (split, modality); within it, language-model tokens are labelled by kind
(``image`` at image-token positions, ``text`` elsewhere, padding ignored) and every vision-tower and
projector token is ``image``. Group labels are ``f"{split}/{modality}/{kind}"``. Statistics live in
float64 accumulators of O(neurons) per layer on that layer's device, so memory does not grow with tokens.
"""
from __future__ import annotations

import inspect
from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import fingerprint, image_token_id, patch_model
from .ops import act_stats
from .stats import DEFAULT_TAU, NeuronStats, empty_stats, group_label

SITES = ("hidden", "pre", "up", "out")
KINDS = ("image", "text")


class _LayerRecorder:
    """Attached to one FusedMLP while profiling: hands the op its group ids and accumulators."""

    def __init__(self, profiler: "Profiler", tower: str, accs: dict[str, torch.Tensor]):
        self.profiler, self.tower, self.accs = profiler, tower, accs

    def op_kwargs(self, layer, num_tokens: int) -> dict:
        gid = self.profiler.group_ids(self.tower, num_tokens, layer.out_proj.weight.device)
        if gid is None:
            return {}
        return {"group_ids": gid, "stats": self.accs.get("hidden"), "pre_stats": self.accs.get("pre"),
                "up_stats": self.accs.get("up"), "tau": self.profiler.tau}

    def record_output(self, layer, y: torch.Tensor) -> None:
        acc = self.accs.get("out")
        if acc is None:
            return
        gid = self.profiler.group_ids(self.tower, y.shape[:-1].numel(), y.device)
        if gid is not None:
            act_stats(y, act="identity", group_ids=gid, stats=acc, tau=self.profiler.tau, write_out=False)


class Profiler:
    """Attach statistics recorders to every fused MLP of ``model`` (patching it if needed).

    Use as a context manager around your own forward passes, calling ``set_batch`` before each::

        with Profiler(model, groups=["forget/multimodal/image", ...]) as prof:
            prof.set_batch("forget", "multimodal", input_ids=ids, attention_mask=am)
            model(...)
        stats = prof.stats
    """

    def __init__(self, model: nn.Module, groups: list[str], *, sites=("hidden",), tau: float = DEFAULT_TAU,
                 towers=None, token_kinds=KINDS):
        bad = [s for s in sites if s not in SITES]
        if bad or not sites:
            raise ValueError(f"unknown sites {bad}; choose from {SITES}")
        if not 0 <= tau < float("inf"):
            raise ValueError(f"tau must be a finite non-negative threshold, got {tau}")
        if len(set(groups)) != len(groups) or not groups:
            raise ValueError("groups must be a non-empty list of distinct labels")
        self.model, self.tau, self.token_kinds = model, float(tau), tuple(token_kinds)
        self.patch = patch_model(model)
        self.image_token = image_token_id(model)
        self.stats = NeuronStats(list(groups), fingerprint(model), self.tau)
        self._recorders = {}
        for name, layer in self.patch.layers.items():
            tower = self.patch.towers[name]
            if towers is not None and tower not in towers:
                continue
            dev = layer.out_proj.weight.device
            accs = {}
            for site in sites:
                if site == "up" and layer.kind != "gated":
                    continue
                width = layer.hidden_size if site == "out" else layer.num_neurons
                accs[site] = self.stats.blocks[NeuronStats.key(name, site)] = empty_stats(len(groups), width, dev)
            self._recorders[name] = _LayerRecorder(self, tower, accs)
        self._lm = None
        self._vision = None
        self._cache: dict = {}

    def __enter__(self) -> "Profiler":
        for name, rec in self._recorders.items():
            self.patch.layers[name].recorder = rec
        return self

    def __exit__(self, *exc) -> None:
        for name in self._recorders:
            self.patch.layers[name].recorder = None
        self._cache.clear()

    def _gid(self, split: str, modality: str, kind: str) -> int:
        if kind not in self.token_kinds:
            return -1
        label = group_label(split, modality, kind)
        try:
            return self.stats.groups.index(label)
        except ValueError:
            return -1

    def set_batch(self, split: str, modality: str, input_ids: torch.Tensor | None = None,
                  attention_mask: torch.Tensor | None = None, profile_mask: torch.Tensor | None = None) -> None:
        """Declare the next forward's data: its (split, modality) and the token layout of the language model."""
        text, image = self._gid(split, modality, "text"), self._gid(split, modality, "image")
        ref = input_ids if input_ids is not None else attention_mask
        if ref is None:
            self._lm = text
        else:
            lm = torch.full(ref.shape, text, dtype=torch.int32, device=ref.device)
            if input_ids is not None and self.image_token is not None:
                lm[input_ids == self.image_token] = image
            if attention_mask is not None:
                lm[attention_mask == 0] = -1
            if profile_mask is not None:
                if profile_mask.shape != ref.shape:
                    raise ValueError(f"profile_mask has shape {tuple(profile_mask.shape)}, input_ids {tuple(ref.shape)}")
                lm[~profile_mask.to(device=ref.device, dtype=torch.bool)] = -1
            self._lm = lm.reshape(-1)
        self._vision = image
        self._cache.clear()

    def group_ids(self, tower: str, num_tokens: int, device) -> torch.Tensor | None:
        """Group id per token for an MLP call of ``tower`` with ``num_tokens`` tokens; None: nothing to record."""
        key = (tower, num_tokens, str(device))
        if key in self._cache:
            return self._cache[key]
        src = self._lm if tower == "language" else self._vision
        if src is None:
            raise RuntimeError("Profiler.set_batch(...) must be called before each forward pass")
        if isinstance(src, int):
            gid = None if src < 0 else torch.full((num_tokens,), src, dtype=torch.int32, device=device)
        else:
            if src.numel() != num_tokens:
                raise RuntimeError(f"a language-model MLP saw {num_tokens} tokens but the batch has {src.numel()} "
                                   "positions; pass input_ids/attention_mask of the sequence the model really runs")
            gid = src.to(device)
        self._cache[key] = gid
        return gid


def _forward_kwargs(model: nn.Module) -> dict:
    """Cheap extras for a statistics-only forward: no KV cache, logits for the last position only."""
    params = inspect.signature(model.forward).parameters
    extra = {}
    if "use_cache" in params:
        extra["use_cache"] = False
    if "logits_to_keep" in params:
        extra["logits_to_keep"] = 1
    return extra


def profile(model: nn.Module, data: dict[tuple[str, str], Iterable[dict]], *, sites=("hidden",),
            tau: float = DEFAULT_TAU, towers=None, token_kinds=KINDS, progress: bool = True) -> NeuronStats:
    """Profile ``model`` over ``data`` ({(split, modality): batches}) and return its NeuronStats.

    A batch is a dict of model kwargs on the model's device, with an optional ``profile_mask`` (B, L) bool
    selecting the language-model positions to profile. Groups: every (split, modality) x token kind.
    """
    if not data:
        raise ValueError("no data to profile: give at least one (split, modality) -> batches entry")
    groups = [group_label(s, m, k) for (s, m) in data for k in token_kinds]
    extra = _forward_kwargs(model)
    was_training = model.training
    model.eval()
    try:
        with Profiler(model, groups, sites=sites, tau=tau, towers=towers, token_kinds=token_kinds) as prof, torch.no_grad():
            for (split, modality), batches in data.items():
                seen = 0
                for batch in tqdm(batches, desc=f"profile {split}/{modality}", disable=not progress, leave=False):
                    batch = dict(batch)
                    pm = batch.pop("profile_mask", None)
                    prof.set_batch(split, modality, batch.get("input_ids"), batch.get("attention_mask"), pm)
                    model(**batch, **extra)
                    seen += 1
                if not seen:
                    raise ValueError(f"the {split}/{modality} data yielded no batch: nothing to profile")
    finally:
        model.train(was_training)
    return prof.stats
