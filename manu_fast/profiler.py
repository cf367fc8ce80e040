"""Profiling: run a model over forget/retain data in each modality, gathering statistics inside the fused MLPs.

Each batch is homogeneous in (split, modality); within it, language-model tokens are labelled by kind:
``image`` / ``video`` / ``audio`` at the placeholder tokens the model's config names (``image_token_id`` ...;
image placeholders between ``video_start_token_id`` and ``video_end_token_id`` are ``video``),
``special`` at the boundary tokens it names (``vision_start_token_id``, ``boi_token_index`` ...), ``text``
elsewhere, padding ignored (``manu_fast.adapters.token_ids``; ``token_kinds={"image": [ids], ...}`` states them).
The labels follow the sequence each language-model stack really runs (``Profiler._stack_input``): the input ids (image
features merged at their placeholders), the input ids after image features put in front (GIT), or the ids the
stack is given itself (an encoder-decoder's decoder runs ``decoder_input_ids``); any other sequence is refused.
Vision-tower and projector tokens are ``image``, or ``video`` in a batch that has video pixels only. A token whose
kind is not profiled is ignored, never counted as another kind. Group labels are ``f"{split}/{modality}/{kind}"``. Statistics live in
float64 accumulators of O(neurons) per layer on that layer's (execution) device, so memory does not grow
with tokens and a model split over devices (accelerate ``device_map``, CPU/disk offload) keeps every
layer's statistics next to it until they are saved.

``profile`` can checkpoint its statistics every K batches and resume a killed run exactly (the
checkpoint records how many batches of each (split, modality) it holds), count or refuse non-finite
activations, and run data-parallel on ``torch.distributed`` (see ``manu_fast.distributed``).
"""
from __future__ import annotations

import inspect
import json
import threading
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import default_token_kinds, fingerprint, forward_kwargs, get_patch, patch_model, token_ids, video_span_ids
from .digests import BatchDigests, weights_digest
from .io import parse_json
from .ops import act_stats
from .schema import KIND_SITES, NONFINITE_POLICIES, SITES, STATISTICS, TOKEN_KINDS, data_key
from .stats import DEFAULT_TAU, FIELD_INDEX, NeuronStats, StatsFileError, empty_stats, group_label

CHECKPOINT_KEY = "checkpoint"  # safetensors metadata entry holding the resume position
_ACTIVE_LOCK = threading.Lock()  # guards Patch.active_profiler


class NonFiniteActivationError(FloatingPointError):
    """NaN/Inf activations met while profiling with ``on_nonfinite="error"``."""


class _LayerRecorder:
    """The ``layers.Recorder`` attached to one FusedMLP while profiling: hands the op its group ids and
    accumulators."""

    def __init__(self, profiler: "Profiler", tower: str, accs: dict[str, torch.Tensor], device: torch.device,
                 stack: str | None = None):
        self.profiler, self.tower, self.accs, self.device, self.stack = profiler, tower, accs, device, stack

    def op_kwargs(self, layer, num_tokens: int) -> dict:
        # the accumulators' device, not out_linear.weight.device: under accelerate offload that weight is on
        # "meta" until down_proj's own pre-forward hook loads it, which is after this call
        gid = self.profiler.group_ids(self.tower, num_tokens, self.device, self.stack)
        if gid is None:
            return {}
        if layer.part:  # its pre/up sites come from hooks on its input Linears (record_input)
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
        gid = self.profiler.group_ids(self.tower, a.shape[:-1].numel(), a.device, self.stack)
        if gid is not None:
            act_stats(a.detach(), act="identity", group_ids=gid, stats=acc, tau=self.profiler.tau, write_out=False)


def resolve_token_kinds(model: nn.Module, token_kinds=None, special_token_ids=(), processor=None):
    """(kinds profiled, {kind: token ids}) from the model's config (``token_ids``), the user's choices and ids.

    ``token_kinds``: None (``default_token_kinds``), kind names, or ``{kind: [token ids]}``: those kinds are
    profiled as well as the default ones and their ids replace the config's (``{"image": [151938]}``);
    ``special_token_ids`` add ``special`` ids."""
    ids = token_ids(model, processor)
    if isinstance(token_kinds, dict):
        stated = {k: tuple(sorted({int(i) for i in ([v] if isinstance(v, int) else v)})) for k, v in token_kinds.items()}
        bad = [k for k in stated if k not in TOKEN_KINDS or k == "text"]
        if bad:
            raise ValueError(f"token_kinds states ids of {bad}; state ids of {[k for k in TOKEN_KINDS if k != 'text']} "
                             "(every other token is text)")
        if any(not v for v in stated.values()):
            raise ValueError(f"token_kinds states no id for {[k for k, v in stated.items() if not v]}")
        for kind, values in stated.items():
            for other in list(ids):
                ids[other] = tuple(i for i in ids[other] if i not in values)
            ids[kind] = values
        ids = {k: v for k, v in ids.items() if v}
        kinds = tuple(k for k in TOKEN_KINDS if k in ("image", "text") or k in ids)
    else:
        kinds = default_token_kinds(model) if token_kinds is None else tuple(token_kinds)
    bad = [k for k in kinds if k not in TOKEN_KINDS]
    if bad:
        raise ValueError(f"unknown token kinds {bad}; choose from {TOKEN_KINDS}")
    if special_token_ids:
        ids["special"] = tuple(sorted({*ids.get("special", ()), *map(int, special_token_ids)}))
    return kinds, ids


def language_stacks(model: nn.Module, names) -> dict[str, str]:
    """{MLP name: its stack}: the module holding the ModuleList of layers the MLP is in (``model.language_model``,
    an encoder-decoder's ``...encoder`` and ``...decoder``); the sequence that stack runs is what the MLP sees."""
    out = {}
    for name in names:
        parts = name.split(".")
        for i in range(len(parts) - 1, 0, -1):
            if parts[i].isdigit() and isinstance(model.get_submodule(".".join(parts[:i])), nn.ModuleList):
                out[name] = ".".join(parts[:i - 1])
                break
    return out


def _ids_root(model: nn.Module, stack: str) -> str | None:
    """The module at or above ``stack`` that takes the token ids of its sequence (its forward has ``input_ids``):
    the stack itself (``LlamaModel``, a BART decoder) or the model around it (a BERT-style decoder's embeddings sit
    in ``BertModel``, above its ``encoder`` stack; GIT's in ``GitModel``)."""
    parts = stack.split(".")
    for i in range(len(parts), 0, -1):
        path = ".".join(parts[:i])
        if "input_ids" in inspect.signature(model.get_submodule(path).forward).parameters:
            return path
    return None


# what a language-model stack attends to when it reads the image by cross-attention (BART/BERT decoders of
# encoder-decoders, Mllama, Idefics 1)
_CROSS_ATTENDED = ("encoder_hidden_states", "cross_attention_states", "image_hidden_states")


def _first_tensor(args: tuple, kwargs: dict, keys: tuple[str, ...]) -> torch.Tensor | None:
    for key in keys:
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    return args[0] if args and isinstance(args[0], torch.Tensor) else None


class Profiler:
    """Attach statistics recorders to every fused MLP of ``model`` (patching it if needed).

    ``token_kinds``: the language-model token kinds to profile (default: ``default_token_kinds(model)``, image
    and text plus every kind the config names tokens of), or ``{kind: [token ids]}`` stating the ids of kinds
    (``resolve_token_kinds``); ``special_token_ids``: more ids to label ``special`` (boundary tokens the config
    does not name, e.g. Idefics3's ``<fake_token_around_image>``); ``processor``: its token attributes
    (``image_token_id``, ``image_token``) name ids too.

    Use as a context manager around your own forward passes, calling ``set_batch`` before each (and
    ``end_batch`` after each, to be warned on leaving about batches with pixels whose language model saw no image
    token)::

        with Profiler(model, groups=["forget/multimodal/image", ...]) as prof:
            prof.set_batch("forget", "multimodal", input_ids=ids, attention_mask=am)
            model(...)
            prof.end_batch(has_pixels=True)
        stats = prof.stats
    """

    def __init__(self, model: nn.Module, groups: list[str], *, sites=("hidden",), tau: float = DEFAULT_TAU,
                 towers=None, token_kinds=None, special_token_ids=(), processor=None):
        bad = [s for s in sites if s not in SITES]
        if bad or not sites:
            raise ValueError(f"unknown sites {bad}; choose from {SITES}")
        if not 0 <= tau < float("inf"):
            raise ValueError(f"tau must be a finite non-negative threshold, got {tau}")
        if isinstance(groups, str) or len(set(groups)) != len(groups) or not groups:
            raise ValueError("groups must be a non-empty list of distinct labels")
        bad = [g for g in groups if not isinstance(g, str) or len(g.split("/")) != 3 or not all(g.split("/"))]
        if bad:
            raise ValueError(f"group labels must be split/modality/kind, got {bad[0]!r}")
        self.patch = patch_model(model)
        self.token_kinds, ids = resolve_token_kinds(model, token_kinds, special_token_ids, processor)
        self.model, self.tau = model, float(tau)
        self._kind_ids = {k: torch.tensor(v) for k, v in ids.items()}
        self._kind_ids_on: dict[torch.device, dict[str, torch.Tensor]] = {}
        self._video_span = video_span_ids(model) if "image" in ids else None
        self.stats = NeuronStats(list(groups), fingerprint(model), self.tau)
        self._recorders = {}
        stacks = language_stacks(model, [n for n, t in self.patch.towers.items() if t == "language"
                                          and (towers is None or t in towers)])
        self._stacks = sorted(set(stacks.values()))
        self._has_vision = any(t == "vision" for t in self.patch.towers.values())
        self._hooks = []
        no_input_sites = []
        for name, layer in self.patch.layers.items():
            tower = self.patch.towers[name]
            if towers is not None and tower not in towers:
                continue
            dev = layer.execution_device
            accs = {}
            for site in sites:
                if site not in KIND_SITES[layer.kind]:
                    if layer.kind == "gate_up" and site in ("pre", "up"):  # one Linear gives gate and up: no own site
                        no_input_sites.append(name)
                    continue
                width = layer.hidden if site == "out" else layer.neurons
                accs[site] = self.stats.blocks[NeuronStats.key(name, site)] = empty_stats(len(groups), width, dev)
            self._recorders[name] = _LayerRecorder(self, tower, accs, dev, stacks.get(name))
        if no_input_sites:
            warnings.warn(f"manu_fast.Profiler: {len(set(no_input_sites))} MLPs compute gate and up in one Linear "
                          f"({no_input_sites[0]} ...): their 'pre'/'up' sites are not profiled (their 'hidden' and "
                          "'out' sites are)", stacklevel=2)
        self._lm = None
        self._vision = None
        self._batch = None  # (split, modality, input_ids, attention_mask, profile_mask, vision_kind) of set_batch
        self._seen: dict[str, torch.Tensor] = {}  # stack -> labels of the sequence it ran in this batch
        self._own: dict[str, torch.Tensor] = {}  # stack -> labels of token ids of its own (decoder inputs)
        self._lm_vision: list = []  # counts of language-model positions of this batch that are image/video
        self._blind = 0  # batches with pixels whose language model saw no image/video position (end_batch)
        self._cache: dict = {}

    def __enter__(self) -> "Profiler":
        with _ACTIVE_LOCK:  # one profiler per model at a time: a second would share (and stop) the recorders
            if getattr(self.patch, "active_profiler", None) is not None:
                raise RuntimeError("this model is already being profiled (a Profiler or profile() is active on it, in "
                                   "this or another thread): profile one model at a time, or use a copy of the model")
            self.patch.active_profiler = self
        for name, rec in self._recorders.items():
            self.patch.layers[name].recorder = rec
        for stack in self._stacks:
            root = _ids_root(self.model, stack)
            if root is not None:  # registered first: on the stack itself it runs before the stack's own hook
                self._hooks.append(self.model.get_submodule(root).register_forward_pre_hook(
                    lambda mod, args, kwargs, stack=stack: self._ids_input(stack, args, kwargs), with_kwargs=True))
            self._hooks.append(self.model.get_submodule(stack).register_forward_pre_hook(
                lambda mod, args, kwargs, stack=stack: self._stack_input(stack, args, kwargs), with_kwargs=True))
        return self

    def __exit__(self, exc_type, *exc) -> None:
        for name in self._recorders:
            self.patch.layers[name].recorder = None
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._cache.clear()
        if exc_type is None:
            self._warn_if_blind()
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

    def _labels(self, split: str, modality: str, ids: torch.Tensor, vision_kind: str) -> torch.Tensor:
        """Group id of every position of the token ids ``ids`` (padding not yet applied)."""
        lm = torch.full(ids.shape, self._gid(split, modality, "text"), dtype=torch.int32, device=ids.device)
        kind_ids = self._kind_ids_here(ids.device)
        # a placeholder that image and video share (Molmo2) is labelled by the batch's pixels: later kinds win
        order = [k for k in ("special", "audio", "video", "image") if k in kind_ids]
        if vision_kind == "video" and "video" in order:
            order.remove("video")
            order.append("video")
        for kind in order:
            lm[torch.isin(ids, kind_ids[kind])] = self._gid(split, modality, kind)
        if self._video_span is not None:  # image placeholders inside a video_start ... video_end span
            start, end = self._video_span
            depth = (ids == start).cumsum(-1) - (ids == end).cumsum(-1)
            frames = (depth > 0) & torch.isin(ids, kind_ids["image"])
            lm[frames] = self._gid(split, modality, "video")
        return lm

    def _vision_positions(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """Image/video placeholders in ``ids`` (counted only when ``end_batch`` needs them: no sync per batch)."""
        return [torch.isin(ids, v).sum() for k, v in self._kind_ids_here(ids.device).items() if k in ("image", "video")]

    def set_batch(self, split: str, modality: str, input_ids: torch.Tensor | None = None,
                  attention_mask: torch.Tensor | None = None, profile_mask: torch.Tensor | None = None,
                  vision_kind: str = "image", vision_positions: torch.Tensor | None = None) -> None:
        """Declare the next forward's data: its (split, modality), the token layout of the language model, and the
        kind of the vision tower's tokens (``"video"`` for a batch of video frames). ``vision_positions``: a mask of
        the input ids' shape marking the positions the model fills with image features when its ids do not
        (Kosmos-2's ``image_embeds_position_mask``); they are labelled ``vision_kind``."""
        if vision_kind not in ("image", "video"):
            raise ValueError(f"vision_kind must be 'image' or 'video', got {vision_kind!r}")
        text = self._gid(split, modality, "text")
        ref = input_ids if input_ids is not None else attention_mask
        if ref is None:
            self._lm = text
        else:
            lm = (self._labels(split, modality, input_ids, vision_kind) if input_ids is not None
                  else torch.full(ref.shape, text, dtype=torch.int32, device=ref.device))
            if vision_positions is not None:
                if vision_positions.shape != ref.shape:
                    raise ValueError(f"vision_positions has shape {tuple(vision_positions.shape)}, input_ids "
                                     f"{tuple(ref.shape)}")
                lm[vision_positions.to(device=ref.device, dtype=torch.bool)] = self._gid(split, modality, vision_kind)
            if attention_mask is not None:
                lm[attention_mask == 0] = -1
            if profile_mask is not None:
                if profile_mask.shape != ref.shape:
                    raise ValueError(f"profile_mask has shape {tuple(profile_mask.shape)}, input_ids {tuple(ref.shape)}")
                lm[~profile_mask.to(device=ref.device, dtype=torch.bool)] = -1
            self._lm = lm
        self._batch = (split, modality, input_ids, attention_mask, profile_mask, vision_kind)
        self._lm_vision = self._vision_positions(input_ids) if input_ids is not None else []
        if vision_positions is not None:
            self._lm_vision.append(vision_positions.sum())
        self._vision = self._gid(split, modality, vision_kind)
        self._seen.clear()
        self._own.clear()
        self._cache.clear()

    def _ids_input(self, stack: str, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the module that gives ``stack`` its token ids (``_ids_root``): when they are not the
        batch's input ids (an encoder-decoder's decoder runs ``decoder_input_ids``), label them for the stack."""
        if self._batch is None:
            return
        split, modality, input_ids, _, profile_mask, vision_kind = self._batch
        ids = _first_tensor(args, kwargs, ("input_ids",))
        if ids is None or ids.is_floating_point() or ids.dim() != 2 or (
                input_ids is not None and ids.shape == input_ids.shape
                and (ids.data_ptr() == input_ids.data_ptr() or torch.equal(ids, input_ids))):  # no sync if passed on
            self._own.pop(stack, None)
            return
        if profile_mask is not None:
            raise RuntimeError(
                f"the language-model stack {stack} runs token ids other than input_ids (e.g. decoder_input_ids): "
                "profile_mask selects input_ids positions only; profile without it, or with "
                "towers=('vision', 'projector')")
        lm = self._labels(split, modality, ids, vision_kind)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.shape == ids.shape:
            lm[mask == 0] = -1
        self._own[stack] = lm
        self._lm_vision += self._vision_positions(ids)

    def _stack_input(self, stack: str, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of a language-model stack: label the sequence it is about to run from the labels of its
        token ids (the batch's, or its own: ``_ids_input``): the same positions, or image features in front of them
        (GIT); anything else is refused."""
        if self._batch is None:
            return
        if any(isinstance(kwargs.get(k), torch.Tensor) for k in _CROSS_ATTENDED):
            self._lm_vision.append(1)  # it sees the image through cross-attention: no warning about image ids
        x = _first_tensor(args, kwargs, ("input_ids", "inputs_embeds", "hidden_states"))
        base = self._own.get(stack, self._lm)
        if x is None or x.dim() < 2 or isinstance(base, int):
            return  # no token ids to compare with: every position has the batch's one label
        (b, length), (rows, cols) = x.shape[:2], base.shape
        if (b, length) == (rows, cols):
            self._seen[stack] = base
            return
        if b == rows and length > cols and self._has_vision:
            # image features put in front of the text (GIT): those positions are the vision tower's tokens
            front = torch.full((rows, length - cols), self._vision, dtype=base.dtype, device=base.device)
            self._seen[stack] = torch.cat([front, base], 1)
            self._lm_vision.append(front.numel())
            return
        raise RuntimeError(
            f"the language-model stack {stack} runs {b} x {length} positions but its token ids are {rows} x {cols}: "
            "manu_fast labels the positions it runs only when they are the token ids' (image features merged at "
            "their placeholders), or image features in front of them. Pass the input_ids of the sequence the model "
            "runs, or profile without the language model: towers=('vision', 'projector') (CLI: --towers vision "
            "projector)")

    def end_batch(self, has_pixels: bool) -> None:
        """After a forward: count (on the device, no sync) a batch with pixels whose language model saw no position
        labelled image or video although the model has a vision tower; leaving the Profiler warns about them."""
        if has_pixels and self._has_vision and self._stacks:
            self._blind = self._blind + (sum(self._lm_vision) == 0)

    def _warn_if_blind(self) -> None:
        blind = int(self._blind)
        if blind:
            named = {k: list(v.tolist()) for k, v in self._kind_ids.items() if k in ("image", "video")}
            warnings.warn(f"manu_fast.Profiler: {blind} batches with pixels reached the language model but none of "
                          f"their positions is an image or video token (ids known: {named or 'none'}); their image "
                          "positions are profiled as text. State the ids: profile(..., token_kinds={'image': [...]}) "
                          "(CLI: --image-token-ids)", stacklevel=3)

    def group_ids(self, tower: str, num_tokens: int, device, stack: str | None = None) -> torch.Tensor | None:
        """Group id per token for an MLP call of ``tower`` (in the language-model ``stack``) with ``num_tokens``
        tokens; None: nothing to record."""
        key = (tower, stack, num_tokens, str(device))
        if key in self._cache:
            return self._cache[key]
        src = self._seen.get(stack, self._lm) if tower == "language" else self._vision
        if src is None:
            raise RuntimeError("Profiler.set_batch(...) must be called before each forward pass")
        if isinstance(src, int):
            gid = None if src < 0 else torch.full((num_tokens,), src, dtype=torch.int32, device=device)
        else:
            src = src.reshape(-1)
            if src.numel() != num_tokens:
                raise RuntimeError(f"a language-model MLP saw {num_tokens} tokens but the batch has {src.numel()} "
                                   "positions; pass input_ids/attention_mask of the sequence the model really runs")
            gid = src.to(device)
        self._cache[key] = gid
        return gid


def _vision_positions(batch: dict) -> torch.Tensor | None:
    """A batch entry marking the language-model positions of image features when the ids do not: named
    ``*_position_mask`` after an image (Kosmos-2's ``image_embeds_position_mask``), with the input ids' shape."""
    ids = batch.get("input_ids")
    for key, value in batch.items():
        if (key.endswith("position_mask") and any(w in key for w in ("image", "vision", "video"))
                and isinstance(value, torch.Tensor) and ids is not None and value.shape == ids.shape):
            return value
    return None


def _vision_kind(batch: dict) -> str:
    """``video`` for a batch whose only pixels are video frames, else ``image``."""
    video = any(k.startswith("pixel_values_video") for k in batch)
    image = any(k.startswith("pixel_values") and not k.startswith("pixel_values_video") for k in batch)
    if video and image:
        raise ValueError("a batch holds both image and video pixels: the vision tower's statistics could not be "
                         "labelled image or video; give images and videos in separate batches")
    return "video" if video else "image"


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
    ids, mask = batch.get("input_ids"), batch.get("attention_mask")
    if isinstance(ids, torch.Tensor) and (ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool):
        raise ValueError(f"batch {number} of {key}: input_ids must hold integer token ids, not {ids.dtype}")
    if isinstance(ids, torch.Tensor) and isinstance(mask, torch.Tensor) and mask.shape != ids.shape:
        raise ValueError(f"batch {number} of {key}: attention_mask has shape {tuple(mask.shape)}, input_ids "
                         f"{tuple(ids.shape)}")


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
        key = data_key(split, modality)
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
                           vision_kind=_vision_kind(batch), vision_positions=_vision_positions(batch))
            model(**batch, **extra)
            prof.end_batch(has_pixels=any("pixel_values" in k for k in batch))
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
            tau: float = DEFAULT_TAU, towers=None, token_kinds=None, special_token_ids=(), processor=None,
            progress: bool = True,
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
    (``token_kinds``, default ``manu_fast.adapters.default_token_kinds(model)``, or ``{kind: [token ids]}``;
    ``special_token_ids`` and ``processor`` as in ``Profiler``). A batch with video pixels
    (``pixel_values_videos``) and no image pixels labels its vision-tower tokens ``video``; give images and videos
    in separate batches. A batch entry ``image_embeds_position_mask`` (Kosmos-2) marks image positions.

    Args:
        checkpoint: path of a checkpoint written atomically (temp file + rename) every ``checkpoint_every``
            batches and at the end; it is a statistics file whose metadata also records how many batches of
            each (split, modality) it holds. With ``distributed`` each rank writes its own
            (``manu_fast.distributed.rank_path``).
        resume: continue from ``checkpoint`` when it exists (start afresh when it does not): its statistics
            are loaded and the batches it holds are read but not run, so ``data`` must yield the same batches
            in the same order as the interrupted run. The result equals an uninterrupted run bit for bit. The
            checkpoint records a digest of the weights, their dtype and a digest of every batch's token ids and
            shapes (``manu_fast.digests``): a resume with other weights, dtype or batches is refused.
        on_nonfinite: ``"count"`` excludes NaN/Inf activations from every statistic and counts them in the
            ``nonfinite`` field (a warning gives the total); ``"error"`` raises NonFiniteActivationError at
            the first batch that has any (one device sync per batch).
        distributed: profile on ``torch.distributed`` (launched by torchrun; initialised here if needed): each
            rank runs the batches it is given (shard them with ``manu_fast.distributed.Shard``) and the
            statistics are merged exactly across ranks, so every rank returns the whole-data statistics.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (an HF model), got {type(model).__name__}")
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
    if get_patch(model) is None:
        patch_model(model)  # refuses an unsupported model before anything else
    kinds, _ = resolve_token_kinds(model, token_kinds, special_token_ids, processor)
    groups = [group_label(s, m, k) for (s, m) in data for k in kinds]
    was_training = model.training
    model.eval()
    error = None
    try:
        with Profiler(model, groups, sites=sites, tau=tau, towers=towers, token_kinds=token_kinds,
                      special_token_ids=special_token_ids, processor=processor) as prof, torch.no_grad():
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
