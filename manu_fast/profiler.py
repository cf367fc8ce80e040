"""Profiling: run a model over forget/retain data in each modality, gathering statistics inside the fused MLPs.

Each batch is homogeneous in (split, modality); within it, language-model tokens are labelled by kind:
``image`` / ``video`` / ``audio`` at the placeholder tokens the model's config names (``image_token_id`` ...;
image placeholders between ``video_start_token_id`` and ``video_end_token_id`` are ``video``),
``special`` at the boundary tokens it names (``vision_start_token_id``, ``boi_token_index`` ...), ``text``
elsewhere, padding ignored (``manu_fast.adapters.token_ids``). Vision-tower and projector tokens are ``image``, or
``video`` in a batch that has video pixels only. A token whose kind is not profiled is ignored, never counted as
another kind. Group labels are ``f"{split}/{modality}/{kind}"``. Statistics live in
float64 accumulators of O(neurons) per layer on that layer's (execution) device, so memory does not grow
with tokens and a model split over devices (accelerate ``device_map``, CPU/disk offload) keeps every
layer's statistics next to it until they are saved.

``profile`` can checkpoint its statistics every K batches and resume a killed run exactly (the
checkpoint records how many batches of each (split, modality) it holds), count or refuse non-finite
activations, and run data-parallel on ``torch.distributed`` (see ``manu_fast.distributed``).
"""
from __future__ import annotations

import json
import threading
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import default_token_kinds, fingerprint, forward_kwargs, patch_model, token_ids, video_span_ids
from .digests import BatchDigests, weights_digest
from .io import parse_json
from .layers import MLPPart
from .ops import act_stats
from .schema import NONFINITE_POLICIES, SITES, STATISTICS, TOKEN_KINDS
from .stats import DEFAULT_TAU, FIELD_INDEX, NeuronStats, StatsFileError, empty_stats, group_label

CHECKPOINT_KEY = "checkpoint"  # safetensors metadata entry holding the resume position
_ACTIVE_LOCK = threading.Lock()  # guards Patch.active_profiler


class NonFiniteActivationError(FloatingPointError):
    """NaN/Inf activations met while profiling with ``on_nonfinite="error"``."""


class _LayerRecorder:
    """Attached to one FusedMLP while profiling: hands the op its group ids and accumulators."""

    def __init__(self, profiler: "Profiler", tower: str, accs: dict[str, torch.Tensor], device: torch.device):
        self.profiler, self.tower, self.accs, self.device = profiler, tower, accs, device

    def op_kwargs(self, layer, num_tokens: int) -> dict:
        # the accumulators' device, not out_proj.weight.device: under accelerate offload that weight is on
        # "meta" until down_proj's own pre-forward hook loads it, which is after this call
        gid = self.profiler.group_ids(self.tower, num_tokens, self.device)
        if gid is None:
            return {}
        if isinstance(layer, MLPPart):  # its pre/up sites come from hooks on its input Linears (record_input)
            return {"group_ids": gid, "stats": self.accs.get("hidden"), "tau": self.profiler.tau}
        return {"group_ids": gid, "stats": self.accs.get("hidden"), "pre_stats": self.accs.get("pre"),
                "up_stats": self.accs.get("up"), "tau": self.profiler.tau}

    def record_output(self, layer, y: torch.Tensor) -> None:
        self._record("out", y)

    def record_input(self, layer, site: str, a: torch.Tensor) -> None:
        """Statistics of an MLP part's input Linear output (site 'pre' or 'up')."""
        self._record(site, a)

    def _record(self, site: str, a: torch.Tensor) -> None:
        acc = self.accs.get(site)
        if acc is None:
            return
        gid = self.profiler.group_ids(self.tower, a.shape[:-1].numel(), a.device)
        if gid is not None:
            act_stats(a.detach(), act="identity", group_ids=gid, stats=acc, tau=self.profiler.tau, write_out=False)


class Profiler:
    """Attach statistics recorders to every fused MLP of ``model`` (patching it if needed).

    ``token_kinds``: the language-model token kinds to profile (default: ``default_token_kinds(model)``, image
    and text plus every kind the config names tokens of); ``special_token_ids``: more ids to label ``special``
    (boundary tokens the config does not name, e.g. Idefics3's ``<fake_token_around_image>``).

    Use as a context manager around your own forward passes, calling ``set_batch`` before each::

        with Profiler(model, groups=["forget/multimodal/image", ...]) as prof:
            prof.set_batch("forget", "multimodal", input_ids=ids, attention_mask=am)
            model(...)
        stats = prof.stats
    """

    def __init__(self, model: nn.Module, groups: list[str], *, sites=("hidden",), tau: float = DEFAULT_TAU,
                 towers=None, token_kinds=None, special_token_ids=()):
        bad = [s for s in sites if s not in SITES]
        if bad or not sites:
            raise ValueError(f"unknown sites {bad}; choose from {SITES}")
        if not 0 <= tau < float("inf"):
            raise ValueError(f"tau must be a finite non-negative threshold, got {tau}")
        if len(set(groups)) != len(groups) or not groups:
            raise ValueError("groups must be a non-empty list of distinct labels")
        self.patch = patch_model(model)
        self.token_kinds = default_token_kinds(model) if token_kinds is None else tuple(token_kinds)
        bad = [k for k in self.token_kinds if k not in TOKEN_KINDS]
        if bad:
            raise ValueError(f"unknown token kinds {bad}; choose from {TOKEN_KINDS}")
        self.model, self.tau = model, float(tau)
        ids = token_ids(model)
        if special_token_ids:
            ids["special"] = tuple(sorted({*ids.get("special", ()), *map(int, special_token_ids)}))
        self._kind_ids = {k: torch.tensor(v) for k, v in ids.items()}
        self._kind_ids_on: dict[torch.device, dict[str, torch.Tensor]] = {}
        self._video_span = video_span_ids(model) if "image" in ids else None
        self.stats = NeuronStats(list(groups), fingerprint(model), self.tau)
        self._recorders = {}
        no_input_sites = []
        for name, layer in self.patch.layers.items():
            tower = self.patch.towers[name]
            if towers is not None and tower not in towers:
                continue
            dev = layer.execution_device
            accs = {}
            for site in sites:
                if site == "up" and layer.kind not in ("gated", "gate_up"):
                    continue
                if site in ("pre", "up") and layer.kind == "gate_up":  # one Linear gives gate and up: no own site
                    no_input_sites.append(name)
                    continue
                width = layer.hidden_size if site == "out" else layer.num_neurons
                accs[site] = self.stats.blocks[NeuronStats.key(name, site)] = empty_stats(len(groups), width, dev)
            self._recorders[name] = _LayerRecorder(self, tower, accs, dev)
        if no_input_sites:
            warnings.warn(f"manu_fast.Profiler: {len(set(no_input_sites))} MLPs compute gate and up in one Linear "
                          f"({no_input_sites[0]} ...): their 'pre'/'up' sites are not profiled (their 'hidden' and "
                          "'out' sites are)", stacklevel=2)
        self._lm = None
        self._vision = None
        self._cache: dict = {}

    def __enter__(self) -> "Profiler":
        with _ACTIVE_LOCK:  # one profiler per model at a time: a second would share (and stop) the recorders
            if getattr(self.patch, "active_profiler", None) is not None:
                raise RuntimeError("this model is already being profiled (a Profiler or profile() is active on it, in "
                                   "this or another thread): profile one model at a time, or use a copy of the model")
            self.patch.active_profiler = self
        for name, rec in self._recorders.items():
            self.patch.layers[name].recorder = rec
        return self

    def __exit__(self, *exc) -> None:
        for name in self._recorders:
            self.patch.layers[name].recorder = None
        self._cache.clear()
        with _ACTIVE_LOCK:
            if getattr(self.patch, "active_profiler", None) is self:
                self.patch.active_profiler = None

    def _gid(self, split: str, modality: str, kind: str) -> int:
        if kind not in self.token_kinds:
            return -1
        label = group_label(split, modality, kind)
        try:
            return self.stats.groups.index(label)
        except ValueError:
            return -1

    def _kind_ids_here(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The token ids of each kind on ``device``, copied there once (a copy from pageable host memory per batch
        would make the host wait for the GPU's queued work before every forward)."""
        if device not in self._kind_ids_on:
            self._kind_ids_on[device] = {k: v.to(device) for k, v in self._kind_ids.items()}
        return self._kind_ids_on[device]

    def set_batch(self, split: str, modality: str, input_ids: torch.Tensor | None = None,
                  attention_mask: torch.Tensor | None = None, profile_mask: torch.Tensor | None = None,
                  vision_kind: str = "image") -> None:
        """Declare the next forward's data: its (split, modality), the token layout of the language model, and the
        kind of the vision tower's tokens (``"video"`` for a batch of video frames)."""
        if vision_kind not in ("image", "video"):
            raise ValueError(f"vision_kind must be 'image' or 'video', got {vision_kind!r}")
        text = self._gid(split, modality, "text")
        ref = input_ids if input_ids is not None else attention_mask
        if ref is None:
            self._lm = text
        else:
            lm = torch.full(ref.shape, text, dtype=torch.int32, device=ref.device)
            if input_ids is not None:
                kind_ids = self._kind_ids_here(input_ids.device)
                for kind, ids in kind_ids.items():
                    lm[torch.isin(input_ids, ids)] = self._gid(split, modality, kind)
                if self._video_span is not None:  # image placeholders inside a video_start ... video_end span
                    start, end = self._video_span
                    depth = (input_ids == start).cumsum(-1) - (input_ids == end).cumsum(-1)
                    frames = (depth > 0) & torch.isin(input_ids, kind_ids["image"])
                    lm[frames] = self._gid(split, modality, "video")
            if attention_mask is not None:
                lm[attention_mask == 0] = -1
            if profile_mask is not None:
                if profile_mask.shape != ref.shape:
                    raise ValueError(f"profile_mask has shape {tuple(profile_mask.shape)}, input_ids {tuple(ref.shape)}")
                lm[~profile_mask.to(device=ref.device, dtype=torch.bool)] = -1
            self._lm = lm.reshape(-1)
        self._vision = self._gid(split, modality, vision_kind)
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


def _vision_kind(batch: dict) -> str:
    """``video`` for a batch whose only pixels are video frames, else ``image``."""
    video = any(k.startswith("pixel_values_video") for k in batch)
    image = any(k.startswith("pixel_values") and not k.startswith("pixel_values_video") for k in batch)
    if video and image:
        raise ValueError("a batch holds both image and video pixels: the vision tower's statistics could not be "
                         "labelled image or video; give images and videos in separate batches")
    return "video" if video else "image"


def _data_key(split: str, modality: str) -> str:
    return f"{split}/{modality}"


def _block_sums(stats: NeuronStats, field: str, per_group: bool) -> dict[str, list[float] | float]:
    """Sum of one field of every block (per group or in total), with one device->host copy per device."""
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for key, block in stats.blocks.items():
        row = block[FIELD_INDEX[field]]
        by_device.setdefault(block.device, []).append((key, row.sum(-1) if per_group else row.sum()))
    out = {}
    for items in by_device.values():
        values = torch.stack([v for _, v in items]).cpu().tolist()
        out.update(zip((k for k, _ in items), values))
    return out


def run_identity(model: nn.Module) -> dict:
    """What a checkpoint or a distributed merge must share beyond the layout: the weights (a sampled digest,
    ``manu_fast.digests.weights_digest``) and their dtypes."""
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    return {"weights": weights_digest(model), "dtype": ",".join(dtypes)}


def save_checkpoint(path, stats: NeuronStats, position: dict[str, int], *, complete: bool = False,
                    rank: int = 0, world_size: int = 1, run: dict | None = None) -> None:
    """Write ``stats`` and the resume position ({"split/modality": batches done}) atomically to ``path``.

    The file is an ordinary statistics file (``NeuronStats.load`` reads it) with one more metadata entry; ``run``
    (``run_identity`` plus ``batches``: {data key: digest of its batches so far}) is stored with it."""
    state = {"progress": position, "complete": complete, "rank": rank, "world_size": world_size,
             "blocks": sorted(stats.blocks), "run": run}
    stats.save(path, {CHECKPOINT_KEY: json.dumps(state, sort_keys=True)})


def checkpoint_state(path) -> dict:
    """The validated resume state of the checkpoint at ``path`` (its metadata entry; the file's checksum is checked
    by ``NeuronStats.load``): StatsFileError naming the field when a field has the wrong type or range."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(CHECKPOINT_KEY)
    except Exception as e:  # noqa: BLE001 - safetensors has its own error types for damaged headers
        raise StatsFileError(f"{path}: not a readable checkpoint ({e})") from None
    if raw is None:
        raise StatsFileError(f"{path}: a statistics file but not a profiling checkpoint (no resume position)")
    state = parse_json(raw, path, CHECKPOINT_KEY)

    def bad(field, what):
        raise StatsFileError(f"{path}: checkpoint field {field!r} {what}")
    if not isinstance(state, dict):
        bad("checkpoint", "must be an object")
    progress = state.get("progress")
    if not isinstance(progress, dict) or not all(isinstance(k, str) and k.count("/") == 1 for k in progress):
        bad("progress", "must be an object {split/modality: batches}")
    for k, n in progress.items():
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < 2**53:
            bad(f"progress.{k}", f"must be a non-negative number of batches, got {str(n)[:40]}")
    world = state.get("world_size")
    if isinstance(world, bool) or not isinstance(world, int) or not 1 <= world <= 2**20:
        bad("world_size", f"must be a number of processes, got {str(world)[:40]}")
    rank = state.get("rank")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        bad("rank", f"must be in [0, {world}), got {str(rank)[:40]}")
    if not isinstance(state.get("complete"), bool):
        bad("complete", "must be true or false")
    run = state.get("run")
    if run is not None and not (isinstance(run, dict) and isinstance(run.get("weights"), str)
                                and isinstance(run.get("dtype"), str) and isinstance(run.get("batches"), dict)
                                and all(isinstance(v, str) for v in run["batches"].values())):
        bad("run", "must be an object with 'weights', 'dtype' and 'batches' digests")
    return state


def load_checkpoint(path, stats: NeuronStats, *, rank: int = 0, world_size: int = 1,
                    run: dict | None = None) -> dict[str, int]:
    """Load the checkpoint at ``path`` into ``stats`` (in place, on each block's device); return its position.

    Refuses (StatsFileError) a checkpoint of another model, other data keys, sites, towers, tau or launch, and, given
    ``run`` (``run_identity`` of this run's model), one made with other weights or another dtype."""
    saved = NeuronStats.load(path, expect_fingerprint=stats.fingerprint)
    state = checkpoint_state(path)
    position = dict(state["progress"])
    ckpt_rank, ckpt_world = state["rank"], state["world_size"]
    if run is not None:
        held = state.get("run") or {}
        if not held:
            raise StatsFileError(f"{path}: the checkpoint records no weights digest (written by an older manu_fast): "
                                 "profile afresh")
        if held["dtype"] != run["dtype"]:
            raise StatsFileError(f"{path}: checkpoint was made with weights in {held['dtype']}, this model's are in "
                                 f"{run['dtype']}: resume with the same --dtype")
        if held["weights"] != run["weights"]:
            raise StatsFileError(f"{path}: checkpoint was made with other weights (weights digest differs): resume with "
                                 "the same model files")
    if saved.groups != stats.groups:
        raise StatsFileError(f"{path}: checkpoint groups {saved.groups} differ from this run's {stats.groups}: "
                             "resume with the same data keys (split, modality), in the same order, and token kinds")
    if saved.tau != stats.tau:
        raise StatsFileError(f"{path}: checkpoint was made with tau={saved.tau}, this run uses tau={stats.tau}")
    if set(saved.blocks) != set(stats.blocks):
        diff = sorted(set(saved.blocks) ^ set(stats.blocks))
        raise StatsFileError(f"{path}: checkpoint profiles other layers/sites ({diff[:3]} ...): "
                             "resume with the same sites and towers")
    if (ckpt_rank, ckpt_world) != (rank, world_size):
        raise StatsFileError(f"{path}: checkpoint of rank {ckpt_rank} of {ckpt_world}, this process is rank {rank} "
                             f"of {world_size}: resume with the same number of processes")
    for key, block in stats.blocks.items():
        block.copy_(saved.blocks[key])
    return position


def _first_nonfinite(stats: NeuronStats, before: dict[str, float]) -> tuple[str, float] | None:
    now = _block_sums(stats, "nonfinite", per_group=False)
    for key, total in now.items():
        if total > before.get(key, 0.0):
            return key, total - before.get(key, 0.0)
    return None


def _warn_about_results(stats: NeuronStats, data_keys: list[tuple[str, str]]) -> None:
    """Warn about (split, modality) data that profiled no token, and about counted NaN/Inf activations."""
    counts = _block_sums(stats, "count", per_group=True)
    for split, modality in data_keys:
        ids = stats.group_ids(split=split, modality=modality)
        if counts and not any(c[i] > 0 for c in counts.values() for i in ids):
            warnings.warn(f"manu_fast.profile: no token of {split}/{modality} was profiled (every position masked out "
                          "by attention_mask/profile_mask, or no profiled tower sees it); its groups are empty and "
                          "selection will refuse them", stacklevel=3)
    nonfinite = {k: v for k, v in _block_sums(stats, "nonfinite", per_group=False).items() if v > 0}
    if nonfinite:
        worst = ", ".join(f"{k}: {int(v)}" for k, v in list(nonfinite.items())[:3])
        warnings.warn(f"manu_fast.profile: {int(sum(nonfinite.values()))} non-finite activation values (NaN/Inf) were "
                      f"excluded from the statistics and counted in the 'nonfinite' field ({worst}"
                      f"{' ...' if len(nonfinite) > 3 else ''}); pass on_nonfinite='error' to stop at the first",
                      stacklevel=3)


def _no_batch_error(key: str) -> ValueError:
    return ValueError(f"the {key} data yielded no batch: nothing to profile (an empty forget/retain set?)")


def _check_batch(batch, key: str, number: int) -> None:
    """Refuse, before its forward, a batch that is no dict of model inputs or holds empty or data-less tensors."""
    if not isinstance(batch, Mapping):
        raise ValueError(f"batch {number} of {key} is a {type(batch).__name__}, not a dict of model inputs "
                         "(input_ids=..., attention_mask=..., pixel_values=...)")
    for name, value in batch.items():
        if not isinstance(value, torch.Tensor):
            continue
        if value.device.type == "meta":
            raise ValueError(f"batch {number} of {key}: input {name!r} is on the 'meta' device (it holds no data)")
        if value.numel() == 0 and name != "profile_mask":
            raise ValueError(f"batch {number} of {key}: input {name!r} is empty (shape {tuple(value.shape)})")


def _profile_batches(model, data, prof: Profiler, *, position: dict[str, int], progress: bool, on_nonfinite: str,
                     checkpoint, checkpoint_every: int, rank: int, world: int, require_batches: bool,
                     run: dict | None = None, resumed_batches: dict[str, str] | None = None) -> dict[str, int]:
    """Run every batch not yet in ``prof.stats`` (``position``: batches done per data key); return batches per key.

    With a checkpoint, the token ids of every batch enter a digest stored with it (``run``); on resume, the digest
    of the batches read again must equal the checkpoint's (``resumed_batches``)."""
    extra = forward_kwargs(model)
    digests = BatchDigests() if checkpoint is not None else None

    def save(complete=False):
        ident = None if run is None else {**run, "batches": digests.digests()}
        save_checkpoint(checkpoint, prof.stats, position, complete=complete, rank=rank, world_size=world, run=ident)
    since_save = 0
    saved = dict(position) if position else None  # what the checkpoint on disk holds (resumed from it)
    nonfinite_before = _block_sums(prof.stats, "nonfinite", per_group=False) if on_nonfinite == "error" else {}
    for (split, modality), batches in data.items():
        key = _data_key(split, modality)
        done = position.get(key, 0)
        seen = 0
        for batch in tqdm(batches, desc=f"profile {key}", disable=not progress, leave=False):
            seen += 1
            _check_batch(batch, key, seen)
            if digests is not None:
                digests.add(key, batch)
                if seen == done and resumed_batches is not None and digests.digest(key) != resumed_batches.get(key):
                    raise StatsFileError(
                        f"{checkpoint}: the first {done} batches of {key} differ from those the checkpoint holds "
                        "(other token ids or batch shapes: another data file, order or --batch-size): resume needs "
                        "the same data, batched the same way, in the same order")
            if seen <= done:  # in the checkpoint already: read (the data must be the same) but not run
                continue
            batch = dict(batch)
            pm = batch.pop("profile_mask", None)
            prof.set_batch(split, modality, batch.get("input_ids"), batch.get("attention_mask"), pm,
                           vision_kind=_vision_kind(batch))
            model(**batch, **extra)
            position[key] = seen
            since_save += 1
            if on_nonfinite == "error":
                found = _first_nonfinite(prof.stats, nonfinite_before)
                if found is not None:
                    held = "no batch yet" if not saved else ", ".join(f"{n} batches of {k}" for k, n in saved.items())
                    where = f"; the checkpoint {checkpoint} holds {held}: fix the cause and resume" if checkpoint else ""
                    raise NonFiniteActivationError(
                        f"{int(found[1])} non-finite activation values (NaN/Inf) in {found[0]} at batch {seen} of "
                        f"{key}{where}. Check the inputs and the model dtype (fp16 overflow?), or pass "
                        "on_nonfinite='count' to exclude and count them")
            if checkpoint is not None and since_save >= checkpoint_every:
                save()
                saved, since_save = dict(position), 0
        if seen < done:
            raise ValueError(f"the checkpoint holds {done} batches of {key} but the data now yields only {seen}: "
                             "resume needs the same data in the same order")
        position[key] = seen
        if require_batches and not seen:
            raise _no_batch_error(key)
    if checkpoint is not None:
        save(complete=True)
    return position


def _check_data(data) -> None:
    """Refuse data that is no {(split, modality): batches} dict, before the model is touched."""
    if not isinstance(data, Mapping):
        raise ValueError(f"data must be a dict {{(split, modality): batches}}, got {type(data).__name__}")
    if not data:
        raise ValueError("no data to profile: give at least one (split, modality) -> batches entry")
    for key, batches in data.items():
        if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, str) and k for k in key)):
            raise ValueError(f"data key {key!r} must be a (split, modality) pair of non-empty strings")
        if any("/" in k for k in key):
            raise ValueError(f"data key {key!r}: split and modality names cannot contain '/' (it separates the parts "
                             "of a group label split/modality/kind)")
        if batches is None or isinstance(batches, (str, bytes, Mapping)) or not isinstance(batches, Iterable):
            raise ValueError(f"data[{key!r}] must be an iterable of batches (a list, a DataLoader), got "
                             f"{type(batches).__name__}")


def profile(model: nn.Module, data: dict[tuple[str, str], Iterable[dict]], *, sites=("hidden",),
            tau: float = DEFAULT_TAU, towers=None, token_kinds=None, special_token_ids=(), progress: bool = True,
            checkpoint=None, checkpoint_every: int = 50, resume: bool = False, on_nonfinite: str = "count",
            distributed: bool = False, statistics: str = "exact", official_layers: str = "as-run"):
    """Profile ``model`` over ``data`` ({(split, modality): batches}) and return its NeuronStats.

    ``statistics="official"`` gathers the official MANU code's statistics instead (``manu_fast.official``: the
    Linear outputs, per-position statistics averaged per chunk of 10 batches, padding included) and returns an
    OfficialStats for ``select_neurons(..., "manu-official")``; ``official_layers`` is ``"as-run"`` (every layer of
    a tower pooled, the last three pruned, as the code runs) or ``"per-layer"`` (one name per layer). The sites,
    tau, towers, token kinds, checkpoints and distributed options are those of the exact statistics only.

    A batch is a dict of model kwargs on the model's device, with an optional ``profile_mask`` (B, L) bool
    selecting the language-model positions to profile. Groups: every (split, modality) x token kind
    (``token_kinds``, default ``manu_fast.adapters.default_token_kinds(model)``; ``special_token_ids`` as in
    ``Profiler``). A batch with video pixels (``pixel_values_videos``) and no image pixels labels its vision-tower
    tokens ``video``; give images and videos in separate batches.

    Args:
        checkpoint: path of a checkpoint written atomically (temp file + rename) every ``checkpoint_every``
            batches and at the end; it is a statistics file whose metadata also records how many batches of
            each (split, modality) it holds. With ``distributed`` each rank writes its own
            (``manu_fast.distributed.rank_path``).
        resume: continue from ``checkpoint`` when it exists (start afresh when it does not): its statistics
            are loaded and the batches it holds are read but not run, so ``data`` must yield the same batches
            in the same order as the interrupted run. The result equals an uninterrupted run bit for bit.
        on_nonfinite: ``"count"`` excludes NaN/Inf activations from every statistic and counts them in the
            ``nonfinite`` field (a warning gives the total); ``"error"`` raises NonFiniteActivationError at
            the first batch that has any (one device sync per batch).
        distributed: profile on ``torch.distributed`` (launched by torchrun; initialised here if needed): each
            rank runs the batches it is given (shard them with ``manu_fast.distributed.Shard``) and the
            statistics are merged exactly across ranks, so every rank returns the whole-data statistics.
    """
    _check_data(data)
    if statistics not in STATISTICS:
        raise ValueError(f"statistics must be one of {STATISTICS}, got {statistics!r}")
    if statistics == "official":
        given = [n for n, v, default in (("sites", tuple(sites), ("hidden",)), ("tau", tau, DEFAULT_TAU),
                                         ("towers", towers, None), ("token_kinds", token_kinds, None),
                                         ("special_token_ids", tuple(special_token_ids), ()),
                                         ("checkpoint", checkpoint, None), ("resume", resume, False),
                                         ("on_nonfinite", on_nonfinite, "count"), ("distributed", distributed, False))
                 if v != default]
        if given:
            raise ValueError(f"statistics='official' fixes its sites, threshold and data handling; "
                             f"{', '.join(given)} apply to the exact statistics only")
        from .official import profile_official
        return profile_official(model, data, official_layers=official_layers, progress=progress)
    if on_nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"on_nonfinite must be one of {NONFINITE_POLICIES}, got {on_nonfinite!r}")
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive number of batches, got {checkpoint_every!r}")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs checkpoint=<path> to resume from")
    rank, world = 0, 1
    if distributed:
        from . import distributed as dist_mod
        rank, world = dist_mod.init()
        if checkpoint is not None:
            checkpoint = dist_mod.rank_path(checkpoint, rank, world)
    if token_kinds is None:
        patch_model(model)  # refuses an unsupported model before anything else
        token_kinds = default_token_kinds(model)
    groups = [group_label(s, m, k) for (s, m) in data for k in token_kinds]
    was_training = model.training
    model.eval()
    error = None
    try:
        with Profiler(model, groups, sites=sites, tau=tau, towers=towers, token_kinds=token_kinds,
                      special_token_ids=special_token_ids) as prof, torch.no_grad():
            run = run_identity(model) if checkpoint is not None or distributed else None
            position, resumed_batches = {}, None
            if resume and Path(checkpoint).is_file():
                position = load_checkpoint(checkpoint, prof.stats, rank=rank, world_size=world, run=run)
                resumed_batches = checkpoint_state(checkpoint)["run"]["batches"]
            batches_per_key = _profile_batches(
                model, data, prof, position=position, progress=progress, on_nonfinite=on_nonfinite,
                checkpoint=checkpoint, checkpoint_every=checkpoint_every, rank=rank, world=world,
                require_batches=not distributed, run=run, resumed_batches=resumed_batches)
    except Exception as e:
        if not distributed:
            raise
        error = e  # every rank must reach the collective below, or the others would wait forever
    finally:
        model.train(was_training)
    if distributed:
        dist_mod.raise_if_any_rank_failed(error)
        dist_mod.check_same_layout(prof.stats, run=run)  # same groups, hence the same data keys, before summing per key
        totals = dist_mod.sum_counts(batches_per_key)
        empty = [key for key, n in totals.items() if n == 0]
        if empty:
            raise _no_batch_error(empty[0])
        dist_mod.all_reduce_stats(prof.stats)
    _warn_about_results(prof.stats, list(data))
    return prof.stats
