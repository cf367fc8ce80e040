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
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import default_token_kinds, fingerprint, get_patch, patch_model, token_ids, video_span_ids
from .layers import MLPPart
from .ops import act_stats
from .schema import NONFINITE_POLICIES, SITES, TOKEN_KINDS
from .stats import DEFAULT_TAU, FIELD_INDEX, NeuronStats, StatsFileError, empty_stats, group_label

CHECKPOINT_KEY = "checkpoint"  # safetensors metadata entry holding the resume position


class NonFiniteActivationError(FloatingPointError):
    """NaN/Inf activations met while profiling with ``on_nonfinite="error"``."""


class _LayerRecorder:
    """Attached to one FusedMLP while profiling: hands the op its group ids and accumulators."""

    def __init__(self, profiler: "Profiler", tower: str, accs: dict[str, torch.Tensor], device: torch.device,
                 stack: str | None = None):
        self.profiler, self.tower, self.accs, self.device, self.stack = profiler, tower, accs, device, stack

    def op_kwargs(self, layer, num_tokens: int) -> dict:
        # the accumulators' device, not out_proj.weight.device: under accelerate offload that weight is on
        # "meta" until down_proj's own pre-forward hook loads it, which is after this call
        gid = self.profiler.group_ids(self.tower, num_tokens, self.device, self.stack)
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
        if len(set(groups)) != len(groups) or not groups:
            raise ValueError("groups must be a non-empty list of distinct labels")
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
                if site == "up" and layer.kind not in ("gated", "gate_up"):
                    continue
                if site in ("pre", "up") and layer.kind == "gate_up":  # one Linear gives gate and up: no own site
                    no_input_sites.append(name)
                    continue
                width = layer.hidden_size if site == "out" else layer.num_neurons
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


def _forward_kwargs(model: nn.Module) -> dict:
    """Cheap extras for a statistics-only forward: no KV cache, logits for the last position only."""
    params = inspect.signature(model.forward).parameters
    extra = {}
    if "use_cache" in params:
        extra["use_cache"] = False
    if "logits_to_keep" in params:
        extra["logits_to_keep"] = 1
    return extra


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


def _checkpoint_state(stats: NeuronStats, position: dict[str, int], complete: bool, rank: int, world: int) -> dict:
    return {"progress": position, "complete": complete, "rank": rank, "world_size": world,
            "blocks": sorted(stats.blocks)}


def save_checkpoint(path, stats: NeuronStats, position: dict[str, int], *, complete: bool = False,
                    rank: int = 0, world_size: int = 1) -> None:
    """Write ``stats`` and the resume position ({"split/modality": batches done}) atomically to ``path``.

    The file is an ordinary statistics file (``NeuronStats.load`` reads it) with one more metadata entry."""
    state = _checkpoint_state(stats, position, complete, rank, world_size)
    stats.save(path, {CHECKPOINT_KEY: json.dumps(state, sort_keys=True)})


def load_checkpoint(path, stats: NeuronStats, *, rank: int = 0, world_size: int = 1) -> dict[str, int]:
    """Load the checkpoint at ``path`` into ``stats`` (in place, on each block's device); return its position.

    Refuses (StatsFileError) a checkpoint of another model, other data keys, sites, towers, tau or launch."""
    from safetensors import safe_open
    saved = NeuronStats.load(path, expect_fingerprint=stats.fingerprint)
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(CHECKPOINT_KEY)
    if raw is None:
        raise StatsFileError(f"{path}: a statistics file but not a profiling checkpoint (no resume position)")
    try:
        state = json.loads(raw)
        position = {str(k): int(v) for k, v in state["progress"].items()}
        ckpt_rank, ckpt_world = int(state["rank"]), int(state["world_size"])
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise StatsFileError(f"{path}: checkpoint metadata is damaged ({e})") from None
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
    if any(n < 0 for n in position.values()):
        raise StatsFileError(f"{path}: checkpoint metadata is damaged (negative position {position})")
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


def _profile_batches(model, data, prof: Profiler, *, position: dict[str, int], progress: bool, on_nonfinite: str,
                     checkpoint, checkpoint_every: int, rank: int, world: int, require_batches: bool) -> dict[str, int]:
    """Run every batch not yet in ``prof.stats`` (``position``: batches done per data key); return batches per key."""
    extra = _forward_kwargs(model)
    since_save = 0
    saved = dict(position) if position else None  # what the checkpoint on disk holds (resumed from it)
    nonfinite_before = _block_sums(prof.stats, "nonfinite", per_group=False) if on_nonfinite == "error" else {}
    for (split, modality), batches in data.items():
        key = _data_key(split, modality)
        done = position.get(key, 0)
        seen = 0
        for batch in tqdm(batches, desc=f"profile {key}", disable=not progress, leave=False):
            seen += 1
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
                save_checkpoint(checkpoint, prof.stats, position, rank=rank, world_size=world)
                saved, since_save = dict(position), 0
        if seen < done:
            raise ValueError(f"the checkpoint holds {done} batches of {key} but the data now yields only {seen}: "
                             "resume needs the same data in the same order")
        position[key] = seen
        if require_batches and not seen:
            raise _no_batch_error(key)
    if checkpoint is not None:
        save_checkpoint(checkpoint, prof.stats, position, complete=True, rank=rank, world_size=world)
    return position


def profile(model: nn.Module, data: dict[tuple[str, str], Iterable[dict]], *, sites=("hidden",),
            tau: float = DEFAULT_TAU, towers=None, token_kinds=None, special_token_ids=(), processor=None,
            progress: bool = True,
            checkpoint=None, checkpoint_every: int = 50, resume: bool = False, on_nonfinite: str = "count",
            distributed: bool = False) -> NeuronStats:
    """Profile ``model`` over ``data`` ({(split, modality): batches}) and return its NeuronStats.

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
            in the same order as the interrupted run. The result equals an uninterrupted run bit for bit.
        on_nonfinite: ``"count"`` excludes NaN/Inf activations from every statistic and counts them in the
            ``nonfinite`` field (a warning gives the total); ``"error"`` raises NonFiniteActivationError at
            the first batch that has any (one device sync per batch).
        distributed: profile on ``torch.distributed`` (launched by torchrun; initialised here if needed): each
            rank runs the batches it is given (shard them with ``manu_fast.distributed.Shard``) and the
            statistics are merged exactly across ranks, so every rank returns the whole-data statistics.
    """
    if not data:
        raise ValueError("no data to profile: give at least one (split, modality) -> batches entry")
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
            position = {}
            if resume and Path(checkpoint).is_file():
                position = load_checkpoint(checkpoint, prof.stats, rank=rank, world_size=world)
            batches_per_key = _profile_batches(
                model, data, prof, position=position, progress=progress, on_nonfinite=on_nonfinite,
                checkpoint=checkpoint, checkpoint_every=checkpoint_every, rank=rank, world=world,
                require_batches=not distributed)
    except Exception as e:
        if not distributed:
            raise
        error = e  # every rank must reach the collective below, or the others would wait forever
    finally:
        model.train(was_training)
    if distributed:
        dist_mod.raise_if_any_rank_failed(error)
        dist_mod.check_same_layout(prof.stats)  # same groups, hence the same data keys, before summing per key
        totals = dist_mod.sum_counts(batches_per_key)
        empty = [key for key, n in totals.items() if n == 0]
        if empty:
            raise _no_batch_error(empty[0])
        dist_mod.all_reduce_stats(prof.stats)
    _warn_about_results(prof.stats, list(data))
    return prof.stats
