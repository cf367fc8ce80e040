"""Model adapters: find every MLP of an HF model by structure, driven by one table of model types.

An MLP is recognised by its children (``MLP_LAYOUTS``): gate_proj/up_proj/down_proj (gated), fc1/fc2 or
linear_1/linear_2 or a Sequential(Linear, act, Linear) (plain). Which tower it belongs to (vision,
projector, language) comes from ``MODEL_TABLE``: path fragments per tower, most specific first. Module
paths differ between transformers versions (4.x ``language_model.model.layers`` vs 5.x
``model.language_model.layers``); fragments match any path component, so both are found.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .layers import FusedGatedMLP, FusedMLP, FusedPlainMLP

TOWERS = ("vision", "projector", "language")


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class MLPLayout:
    kind: str                  # "gated" | "plain"
    linears: tuple[str, ...]   # child names: (gate, up, down) or (fc1, fc2)
    acts: tuple[str, ...]      # candidate child names of the activation module


MLP_LAYOUTS = (
    MLPLayout("gated", ("gate_proj", "up_proj", "down_proj"), ("act_fn", "act", "activation_fn")),
    MLPLayout("plain", ("fc1", "fc2"), ("activation_fn", "act", "act_fn")),
    MLPLayout("plain", ("linear_1", "linear_2"), ("act", "activation_fn", "act_fn")),
    MLPLayout("plain", ("0", "2"), ("1",)),  # nn.Sequential(Linear, act, Linear), e.g. Qwen2-VL's patch merger
)


@dataclass(frozen=True)
class ModelSpec:
    """Where a model type keeps its towers: (tower, path fragment) pairs, most specific first.
    A fragment is a dotted run of module names ('' matches everything)."""

    towers: tuple[tuple[str, str], ...]
    image_token_attrs: tuple[str, ...] = ("image_token_id", "image_token_index")


_LLAVA = ModelSpec((("vision", "vision_tower"), ("projector", "multi_modal_projector"), ("language", "language_model")))
_IDEFICS = ModelSpec((("vision", "vision_model"), ("projector", "connector"), ("language", "text_model")))
_QWEN_VL = ModelSpec((("projector", "visual.merger"), ("vision", "visual"), ("language", "language_model")))
_TEXT = ModelSpec((("language", ""),))
_VISION = ModelSpec((("vision", ""),))

MODEL_TABLE: dict[str, ModelSpec] = {
    "llava": _LLAVA, "llava_next": _LLAVA, "llava_onevision": _LLAVA, "vipllava": _LLAVA,
    "idefics2": _IDEFICS, "idefics3": _IDEFICS,
    "qwen2_vl": _QWEN_VL, "qwen2_5_vl": _QWEN_VL,
    "llama": _TEXT, "mistral": _TEXT, "qwen2": _TEXT,
    "clip": _VISION, "clip_vision_model": _VISION, "siglip": _VISION, "siglip_vision_model": _VISION,
}


def register_model(model_type: str, spec: ModelSpec) -> None:
    """Teach manu_fast a new model type: ``register_model("my_vlm", ModelSpec((("vision", "vision_tower"), ...)))``."""
    MODEL_TABLE[model_type] = spec


@dataclass
class MLPInfo:
    name: str
    module: nn.Module
    kind: str
    tower: str
    act_attr: str
    linears: tuple[str, ...]

    @property
    def neurons(self) -> int:
        return getattr(self.module, self.linears[-1]).in_features

    @property
    def hidden(self) -> int:
        return getattr(self.module, self.linears[-1]).out_features


def _match_layout(module: nn.Module):
    if isinstance(module, FusedMLP):
        return None
    children = dict(module.named_children())
    for layout in MLP_LAYOUTS:
        lins = [children.get(n) for n in layout.linears]
        if not all(isinstance(lin, nn.Linear) for lin in lins):
            continue
        act = next((a for a in layout.acts if a in children), None)
        if act is None or len(children) != len(layout.linears) + 1:
            continue
        n = lins[-1].in_features
        if all(lin.out_features == n for lin in lins[:-1]):
            return layout, act
    return None


def _tower(name: str, spec: ModelSpec) -> str | None:
    path = f".{name}."
    for tower, frag in spec.towers:
        if frag == "" or f".{frag}." in path:
            return tower
    return None


def model_type(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    if mt is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no config.model_type; manu_fast adapts HF PreTrainedModels")
    return mt


def find_mlps(model: nn.Module) -> list[MLPInfo]:
    """Every MLP of ``model`` (not yet patched), with its tower, in module order."""
    mt = model_type(model)
    found = [(name, m, *lay) for name, m in model.named_modules() if (lay := _match_layout(m)) is not None]
    spec = MODEL_TABLE.get(mt)
    if spec is None:
        listing = ", ".join(f"{n} ({lay.kind})" for n, _, lay, _ in found[:6]) or "no MLP-shaped modules"
        raise UnsupportedModelError(
            f"model type {mt!r} is not in manu_fast.adapters.MODEL_TABLE (supported: {', '.join(sorted(MODEL_TABLE))}). "
            f"Found {len(found)} MLP-shaped modules: {listing}{' ...' if len(found) > 6 else ''}. Register it with "
            f"manu_fast.adapters.register_model({mt!r}, ModelSpec(towers=(('vision', '<vision path>'), "
            f"('projector', '<projector path>'), ('language', '<language path>'))))")
    out = []
    for name, m, layout, act in found:
        tower = _tower(name, spec)
        if tower is not None:
            out.append(MLPInfo(name, m, layout.kind, tower, act, layout.linears))
    if not out:
        raise UnsupportedModelError(f"no MLP found in model type {mt!r} under the towers {spec.towers}")
    return out


def fingerprint(model: nn.Module) -> dict:
    """What a statistics/mask file must match: model type and every MLP's name, kind, tower and sizes."""
    patch = get_patch(model)
    if patch is not None:
        layers = {n: {"kind": l.kind, "tower": patch.towers[n], "neurons": l.num_neurons, "hidden": l.hidden_size}
                  for n, l in patch.layers.items()}
    else:
        layers = {i.name: {"kind": i.kind, "tower": i.tower, "neurons": i.neurons, "hidden": i.hidden}
                  for i in find_mlps(model)}
    return {"model_type": model_type(model), "layers": layers}


def image_token_id(model: nn.Module) -> int | None:
    spec = MODEL_TABLE.get(model_type(model))
    for attr in spec.image_token_attrs if spec else ():
        v = getattr(model.config, attr, None)
        if v is not None:
            return int(v)
    return None


@dataclass
class Patch:
    """The fused layers installed in a model, and what they replaced (for an exact undo)."""

    model: nn.Module
    layers: dict[str, FusedMLP] = field(default_factory=dict)
    towers: dict[str, str] = field(default_factory=dict)
    originals: dict[str, nn.Module] = field(default_factory=dict)

    def replace(self, name: str, layer: FusedMLP) -> None:
        """Install ``layer`` in place of the fused layer ``name`` (unpatch still restores the original HF module)."""
        _set_submodule(self.model, name, layer)
        self.layers[name] = layer

    def unpatch(self) -> None:
        for name, orig in self.originals.items():
            _set_submodule(self.model, name, orig)
        self.layers.clear()
        self.originals.clear()
        self.model.__dict__.pop("_manu_fast_patch", None)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def get_patch(model: nn.Module) -> Patch | None:
    return model.__dict__.get("_manu_fast_patch")


def patch_model(model: nn.Module) -> Patch:
    """Replace every MLP of ``model`` by a fused layer, in place, sharing the original weights. Idempotent."""
    patch = get_patch(model)
    if patch is not None:
        return patch
    patch = Patch(model)
    for info in find_mlps(model):
        m = info.module
        act = getattr(m, info.act_attr)
        if info.kind == "gated":
            fused = FusedGatedMLP(m.gate_proj, m.up_proj, m.down_proj, act, info.act_attr)
        else:
            fc1, fc2 = info.linears
            fused = FusedPlainMLP(getattr(m, fc1), getattr(m, fc2), act, fc1, fc2, info.act_attr)
        fused.train(m.training)
        hook = getattr(m, "_hf_hook", None)
        if hook is not None:  # accelerate device_map/offload hook on the MLP itself: it moves the MLP's inputs
            from accelerate.hooks import add_hook_to_module
            add_hook_to_module(fused, hook)
        _set_submodule(model, info.name, fused)
        patch.layers[info.name] = fused
        patch.towers[info.name] = info.tower
        patch.originals[info.name] = m
    model.__dict__["_manu_fast_patch"] = patch
    return patch
