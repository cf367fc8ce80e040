"""Model adapters: find every MLP of an HF model and its tower, and patch it. See docs/MODELS.md.

**MLPs** are recognised by their Linear children (``MLP_LAYOUTS``: gate_proj/up_proj/down_proj, fc1/fc2,
linear_1/linear_2, w1/w3/w2, ...) whose widths chain like an MLP's: every input Linear gives N features (2N for one
Linear that computes gate and up together) and the output Linear takes N. The MLP's N neurons are always the input
features of its output Linear. A module that is exactly an MLP (those Linears and one supported activation, nothing
else) and computes ``down(act(gate(x)) * up(x))`` or ``fc2(act(fc1(x)))`` -- checked on a probe input when its
weights are loaded -- is replaced by a fused layer (``manu_fast.layers``). Any other MLP (a projector that also holds
a norm and a patch merger, a decoder layer that holds fc1/fc2 itself, a fused gate_up projection, an activation the
fused op lacks, Linears chained through a functional activation such as ``F.gelu`` read from the forward's source)
keeps its module and forward and gets an ``MLPPart``: hooks on its Linears that mask and profile the neurons.
Mixture-of-experts layers are refused (or, on request, left out) with their module named.

**Towers** (vision, projector, language) are inferred from the config's sub-configs: the topmost modules carrying
``config.vision_config`` (any ``*vision*`` sub-config) root the vision tower, those carrying ``text_config`` the
language model, other sub-configs (Q-Former, perceiver, adapter) the projector; audio towers are left out. Inside a
vision tower, an MLP whose input width differs from its output width (a patch merger) is the projector's. What no
tower roots is the projector (or the language model, when no module carries a text config, except modules whose
path names an image: an image embedding's projection). A model without
sub-configs is one tower: ``vision`` if it reads ``pixel_values``, else ``language``. ``MODEL_TABLE`` overrides the
inference for a model type (``register_model``).
"""
from __future__ import annotations

import inspect
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .activations import activation_name
from .layers import FusedGatedMLP, FusedMLP, FusedPlainMLP, MLPPart, NeuronLayer, Widths, compact_identity
from .schema import MOE_POLICIES, TOKEN_KINDS, TOWERS  # noqa: F401  (TOWERS, TOKEN_KINDS: public names here too)



class UnsupportedModelError(ValueError):
    pass


_ACTS = ("act_fn", "act", "activation_fn")  # the child names an MLP's activation usually has


@dataclass(frozen=True)
class MLPLayout:
    """Child names of an MLP's Linears (dotted for grandchildren): the input Linear(s) (gate and up, or one), then
    the output Linear; and the child names its activation may have (for the fused replacement)."""

    linears: tuple[str, ...]
    acts: tuple[str, ...] = _ACTS


MLP_LAYOUTS: list[MLPLayout] = [
    MLPLayout(("gate_proj", "up_proj", "down_proj")),
    MLPLayout(("w1", "w3", "w2")),  # LFM2
    MLPLayout(("wi_0", "wi_1", "wo")),  # T5 v1.1, Pix2Struct
    MLPLayout(("gate_up_proj", "down_proj")),  # GLM-4V text, Phi-3
    MLPLayout(("fc1", "fc2")),
    MLPLayout(("linear_1", "linear_2")),
    MLPLayout(("linear_fc1", "linear_fc2")),  # Qwen3-VL vision
    MLPLayout(("lin1", "lin2")),  # SAM, GOT-OCR2 vision
    MLPLayout(("linear1", "linear2")),  # DeepSeek-VL aligner
    MLPLayout(("linear_in", "linear_out")),  # Aria projector
    MLPLayout(("up_proj", "down_proj")),  # Nemotron, Apertus
    MLPLayout(("dense_h_to_4h", "dense_4h_to_h")),  # Persimmon (Fuyu)
    MLPLayout(("wi", "wo")),  # T5
    MLPLayout(("merge_linear_1", "merge_linear_2")),  # MiniMax-VL projector
    MLPLayout(("in_proj", "out_proj")),  # Kimi-K2.5 projector (widths must chain, so Mamba mixers do not match)
    MLPLayout(("0", "2"), ("1",)),  # Sequential(Linear, act, Linear), e.g. Qwen2-VL's patch merger
    MLPLayout(("intermediate.dense", "output.dense")),  # BERT-style layer (the MLP split over two children)
    MLPLayout(("intermediate_query.dense", "output_query.dense")),  # BLIP-2 / InstructBLIP Q-Former
]


def register_mlp_layout(*linears: str, acts: tuple[str, ...] = _ACTS) -> None:
    """Teach manu_fast an MLP's Linear names: ``register_mlp_layout("w_in", "w_out")`` (input(s), then output)."""
    if len(linears) not in (2, 3):
        raise ValueError(f"an MLP layout names 2 or 3 Linears (input(s), then output), got {linears}")
    MLP_LAYOUTS.insert(0, MLPLayout(tuple(linears), tuple(acts)))


@dataclass(frozen=True)
class ModelSpec:
    """Where a model type keeps its towers: (tower, path fragment) pairs, most specific first. A fragment is a
    dotted run of module names ('' matches everything); MLPs under no fragment are left out (and reported)."""

    towers: tuple[tuple[str, str], ...]


# Overrides only: model types whose towers the inference gets wrong (none of the tested families; see docs/MODELS.md).
MODEL_TABLE: dict[str, ModelSpec] = {}


def register_model(model_type: str, spec: ModelSpec) -> None:
    """Fix the towers of a model type: ``register_model("my_vlm", ModelSpec((("vision", "vision_tower"), ...)))``."""
    MODEL_TABLE[model_type] = spec


@dataclass
class MLPInfo(Widths):
    """One MLP: ``module`` holds its Linears (child names ``linears``: inputs, then output). ``act_attr`` names its
    activation child when the module is exactly the MLP (fused replacement); None when the MLP is part of a larger
    module (``extra``: the module's other children) or computes its hidden in another way (patched by hooks)."""

    name: str
    module: nn.Module
    kind: str  # "gated" | "plain" | "gate_up" (one Linear gives gate and up)
    tower: str
    act_attr: str | None
    linears: tuple[str, ...]
    path: str = ""  # the module's path ('name' may add the output Linear, when one module holds several MLPs)
    extra: tuple[str, ...] = ()

    @property
    def in_linears(self) -> list[nn.Linear]:
        return [_child(self.module, n) for n in self.linears[:-1]]

    @property
    def out_linear(self) -> nn.Linear:
        return _child(self.module, self.linears[-1])

    @property
    def patched_as(self) -> str:
        return "fused" if self.act_attr is not None else "part"


@dataclass
class Skipped:
    """A module with MLP weights that is not patched, and why."""

    name: str
    reason: str
    moe: bool = False


@dataclass
class ModelMLPs:
    """What ``inspect_model`` found: every MLP with its tower, what was left out and why, and how towers were found."""

    model_type: str
    mlps: list[MLPInfo]
    skipped: list[Skipped]
    roots: dict[str, list[str]]  # tower -> module paths rooting it (inferred), or the MODEL_TABLE fragments
    source: str  # "inferred" | "MODEL_TABLE"


# ---------------------------------------------------------------------------------------------------- MLPs
def _is_activation(m: nn.Module) -> bool:
    """A nonlinearity module (HF or torch): no submodules, not an identity."""
    if next(m.children(), None) is not None:  # e.g. nn.MultiheadAttention, which lives in torch's activation module
        return False
    try:
        return activation_name(m) != "identity"
    except ValueError:
        return type(m).__module__.startswith(("transformers.activations", "torch.nn.modules.activation"))


def _child(module: nn.Module, dotted: str) -> nn.Module | None:
    for part in dotted.split("."):
        module = module._modules.get(part) if module is not None else None
    return module


def _match_layouts(module: nn.Module) -> list[tuple[MLPLayout, str]]:
    """The MLP layouts ``module``'s Linear children form, with their kind (one module may hold several MLPs)."""
    found, used = [], set()
    for layout in MLP_LAYOUTS:
        if used & set(layout.linears):
            continue
        lins = [_child(module, n) for n in layout.linears]
        if not all(isinstance(lin, nn.Linear) for lin in lins):
            continue
        *ins, out = lins
        n = out.in_features
        if len({lin.in_features for lin in ins}) != 1:
            continue
        if len(ins) == 2 and all(lin.out_features == n for lin in ins):
            kind = "gated"
        elif len(ins) == 1 and ins[0].out_features == n:
            kind = "plain"
        elif len(ins) == 1 and ins[0].out_features == 2 * n:
            kind = "gate_up"
        else:
            continue
        used |= set(layout.linears)
        found.append((layout, kind))
    return found


def _fused_act(module: nn.Module, layout: MLPLayout, kind: str) -> str | None:
    """The activation child when ``module`` is exactly one fusable MLP (its Linears + one supported activation)."""
    if kind == "gate_up":
        return None
    children = dict(module.named_children())
    acts = [a for a in layout.acts if a in children]
    if len(acts) != 1 or set(children) != set(layout.linears) | {acts[0]}:
        return None
    try:
        activation_name(children[acts[0]])
    except ValueError:
        return None
    return acts[0]


def _linear_count(child: nn.Module) -> int:
    """Linear layers in a child: itself, or the members of a ModuleList/Sequential."""
    if isinstance(child, nn.Linear):
        return 1
    if isinstance(child, (nn.ModuleList, nn.Sequential)):
        return sum(isinstance(g, nn.Linear) for g in child)
    return 0


# a functional MLP nonlinearity in a forward's source: F.gelu(...), nn.functional.silu(...), ACT2FN[...](...) (not
# sigmoid/tanh: attention gates use them)
_FUNCTIONAL_ACT = r"(?:(?:\w+\.)*(?:F|functional|torch)\.(?:gelu|silu|relu6?|leaky_relu|elu|selu|celu|mish|hardswish|softplus|" \
                  r"quick_gelu)\s*\(|\bACT2FN\s*\[[^\]]*\]\s*\()"
_FORWARD_SOURCES: dict[type, str] = {}


def _forward_source(module: nn.Module) -> str:
    """The source of ``type(module).forward`` ('' when it cannot be read), read once per class."""
    cls = type(module)
    if cls not in _FORWARD_SOURCES:
        try:
            _FORWARD_SOURCES[cls] = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            _FORWARD_SOURCES[cls] = ""
    return _FORWARD_SOURCES[cls]


def _functional_chains(module: nn.Module) -> list[tuple[str, str]]:
    """Pairs (A, B) of Linear children that the module's forward chains through a functional activation, read from
    its source: ``self.B(F.gelu(self.A(x)))``; ``z = F.gelu(self.A(x) ...)``, then ``self.B(z)``; or
    ``y = self.A(x)``, ``z = F.gelu(y ...)``, then ``self.B(z)`` (Phi-4-multimodal's ``img_projection_up -> F.gelu ->
    img_projection_down``). Other uses of an activation (on attention scores, a gate) are not chains."""
    source = _forward_source(module)
    if not source or not re.search(_FUNCTIONAL_ACT, source):
        return []
    names = [n for n, c in module.named_children() if isinstance(c, nn.Linear)]
    chains = []
    for a in names:
        for b in names:
            if a != b and re.search(rf"self\.{b}\s*\(\s*{_FUNCTIONAL_ACT}\s*self\.{a}\s*\(", source):
                chains.append((a, b))
        hidden = [m for m in re.finditer(rf"(\w+)\s*=\s*{_FUNCTIONAL_ACT}\s*self\.{a}\s*\(", source)]
        for assign in re.finditer(rf"(\w+)\s*=\s*self\.{a}\s*\(", source):
            act = re.compile(rf"(\w+)\s*=\s*{_FUNCTIONAL_ACT}\s*{assign.group(1)}\b").search(source, assign.end())
            hidden += [act] if act is not None else []
        for act in hidden:
            for b in names:
                if b != a and re.compile(rf"self\.{b}\s*\(\s*{act.group(1)}\s*[,)]").search(source, act.end()):
                    chains.append((a, b))
    return list(dict.fromkeys(chains))


def _functional_layouts(module: nn.Module) -> list[tuple[MLPLayout, str]]:
    """MLPs written with a functional activation (``_functional_chains``) whose widths chain (A gives the N features
    B takes). They are patched as MLP parts (hooks on A and B)."""
    found, used = [], set()
    for a, b in _functional_chains(module):
        if {a, b} & used or _child(module, a).out_features != _child(module, b).in_features:
            continue
        used |= {a, b}
        found.append((MLPLayout((a, b), ()), "plain"))
    return found


def _unrecognised(module: nn.Module) -> str | None:
    """Why ``module`` looks like an MLP that no layout matched (an activation module next to two or more Linear
    layers, counting those in a ModuleList; or Linears chained through a functional activation), else None."""
    children = dict(module.named_children())
    linears = {n: _linear_count(c) for n, c in children.items()}
    lins = [n for n, k in linears.items() if k]
    acts = [n for n, c in children.items() if _is_activation(c)]
    if not acts:
        chains = _functional_chains(module)
        listed = any(isinstance(c, (nn.ModuleList, nn.Sequential)) and _linear_count(c) for c in children.values())
        if chains or (listed and re.search(_FUNCTIONAL_ACT, _forward_source(module))):
            acts = [f"a functional call in its forward{f' between {chains[0][0]} and {chains[0][1]}' if chains else ''}"]
    if not acts or sum(linears.values()) < 2:
        return None  # one Linear and an activation (a pooler, an LM-head transform) is not an MLP
    return (f"holds Linear layers ({', '.join(lins)}) and an activation ({', '.join(acts)}) but matches no MLP layout "
            f"of manu_fast.adapters.MLP_LAYOUTS; if it is an MLP, name its Linears with "
            f"register_mlp_layout(<input Linear(s)>, <output Linear>)")


def _experts(name: str, module: nn.Module) -> str | None:
    """Why ``module`` is a mixture-of-experts container, else None."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return None
    stacked = [p for p in module.parameters(recurse=False) if p.dim() == 3]
    if stacked and ("expert" in type(module).__name__.lower() or "expert" in name.lower()):
        return (f"mixture-of-experts: {type(module).__name__} holds {stacked[0].shape[0]} experts as 3-D weight "
                "tensors; per-expert statistics are not supported")
    return None


# ---------------------------------------------------------------------------------------------------- towers
_VISION_NAMES = ("vision_tower", "vision_model", "visual", "vision_encoder", "image_encoder")
_PROJECTOR_WORDS = ("merger", "projector", "connector", "adapter", "aligner", "resampler")
_LANGUAGE_NAMES = ("language_model", "text_model", "llm")


def _sub_configs(config) -> list[tuple[str, object]]:
    from transformers import PretrainedConfig
    return [(k, v) for k, v in vars(config).items() if isinstance(v, PretrainedConfig)]


def _sub_config_tower(key: str, carrier: nn.Module | None = None) -> tuple[str | None, str]:
    """(tower, or None with the reason it is left out) of the modules carrying the sub-config ``config.<key>``."""
    k = key.lower()
    if any(w in k for w in ("audio", "speech", "sound")):
        return None, f"audio tower (config.{key}): manu_fast profiles vision, projector and language towers"
    if "vq" in k:
        return None, f"image-generation model (config.{key}): not used to read images"
    if "vision" in k or "visual" in k or "image" in k:
        return "vision", ""
    if "text" in k or k in ("llm_config", "language_config", "decoder"):
        return "language", ""
    if getattr(carrier, "main_input_name", None) == "pixel_values":  # e.g. VisionEncoderDecoder's "encoder"
        return "vision", ""
    return "projector", ""


def _topmost(paths: list[str]) -> list[str]:
    out = []
    for p in paths:
        if not any(p == q or p.startswith(q + ".") for q in out):
            out.append(p)
    return out


def _carriers(model: nn.Module, sub) -> list[str]:
    """Topmost modules whose ``config`` is ``sub`` (or, when none is, of the same config class)."""
    pairs = [(n, getattr(m, "config", None)) for n, m in model.named_modules() if n]
    paths = [n for n, c in pairs if c is sub] or [n for n, c in pairs if type(c) is type(sub)]
    return _topmost(paths)


def _named(model: nn.Module, names: tuple[str, ...]) -> list[str]:
    return _topmost([n for n, _ in model.named_modules() if n and n.rsplit(".", 1)[-1] in names])


def _listing(found: list[tuple[str, str]], limit: int = 6) -> str:
    text = ", ".join(f"{n} ({k})" for n, k in found[:limit]) or "no MLP-shaped modules"
    return text + (f" ... ({len(found)} in all)" if len(found) > limit else "")


def _register_call(mt: str) -> str:
    return (f"manu_fast.adapters.register_model({mt!r}, ModelSpec(towers=(('vision', '<vision path>'), "
            "('projector', '<projector path>'), ('language', '<language path>'))))")


_AUDIO_WORDS = ("audio", "speech", "sound")
_IMAGE_WORDS = ("image", "img", "vision", "visual", "video")


def _rest_tower(path: str, rest: str) -> tuple[str | None, str]:
    """Tower of a module no root covers: by the words of its path (an audio embedding is left out with the audio
    tower; an image embedding is the projector, even where the rest is the language model), else
    ``rest``."""
    parts = path.lower().split(".")
    if any(w in part for part in parts for w in _AUDIO_WORDS):
        return None, f"audio tower's projector ({path}): manu_fast profiles vision, projector and language towers"
    if rest == "language" and any(w in part for part in parts for w in _IMAGE_WORDS):
        return "projector", ""
    return rest, ""


def _resolver(roots: list[tuple[str, str | None, str]], rest: str | None):
    """Tower of a module path: (tower or None, reason when None, the root's path or None); the longest matching root
    wins and what no root covers goes to ``rest`` (``_rest_tower``)."""
    roots = sorted(roots, key=lambda r: -len(r[0]))  # (path, tower or None, reason when None)

    def tower_of(path: str) -> tuple[str | None, str, str | None]:
        for root, tower, reason in roots:
            if root == "" or path == root or path.startswith(root + "."):
                return tower, reason, root
        return (*_rest_tower(path, rest), None)
    return tower_of


def _infer_towers(model: nn.Module, mt: str, found: list[tuple[str, str]]):
    """(tower_of, {tower: root paths}) from the config's sub-configs and the modules carrying them."""
    subs = _sub_configs(model.config)
    if not subs:
        tower = "vision" if getattr(model, "main_input_name", "input_ids") == "pixel_values" else "language"
        return _resolver([("", tower, "")], tower), {tower: [""]}
    roots: list[tuple[str, str | None, str]] = []
    claimed: dict[str, str] = {}
    for key, sub in subs:
        paths = _carriers(model, sub)
        tower, reason = _sub_config_tower(key, model.get_submodule(paths[0]) if paths else None)
        if not paths and tower in ("vision", "language"):
            paths = _named(model, _VISION_NAMES if tower == "vision" else _LANGUAGE_NAMES)
        for p in paths:
            if p in claimed and claimed[p] != key:
                raise UnsupportedModelError(
                    f"model type {mt!r}: cannot tell the towers apart: module {p!r} carries both config.{claimed[p]} "
                    f"and config.{key}. Found MLPs: {_listing(found)}. Register its towers: {_register_call(mt)}")
            claimed[p] = key
            roots.append((p, tower, reason))
    has = {t for _, t, _ in roots}
    if any(_sub_config_tower(k)[0] == "vision" for k, _ in subs) and "vision" not in has:
        raise UnsupportedModelError(
            f"model type {mt!r}: the config has a vision sub-config but no module carries it and none is named "
            f"{'/'.join(_VISION_NAMES)}, so the vision tower is unknown. Found MLPs: {_listing(found)}. "
            f"Register its towers: {_register_call(mt)}")
    # what no root covers: the projector between the towers, or the language model itself when no module carries
    # a text config (e.g. a decoder built into the top-level model)
    rest = "projector" if "language" in has else "language"
    table: dict[str, list[str]] = {}
    for p, t, _ in roots:
        table.setdefault(t or "left out", []).append(p)
    table.setdefault(rest, []).append("(the rest)")
    return _resolver(roots, rest), table


def _table_towers(spec: ModelSpec, mt: str):
    """(tower_of, {tower: fragments}) from a MODEL_TABLE entry: the first fragment in a module's path decides."""
    def tower_of(path: str) -> tuple[str | None, str, str | None]:
        dotted = f".{path}."
        for tower, frag in spec.towers:
            if frag == "" or f".{frag}." in dotted:
                return tower, "", None  # the table says exactly which tower: no vision-internal projector rule
        return None, f"under none of the towers of MODEL_TABLE[{mt!r}] {spec.towers}", None
    table: dict[str, list[str]] = {}
    for tower, frag in spec.towers:
        table.setdefault(tower, []).append(frag)
    return tower_of, table


# ---------------------------------------------------------------------------------------------------- inspection
def model_type(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    if mt is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no config.model_type; manu_fast adapts HF PreTrainedModels")
    return mt


def inspect_model(model: nn.Module) -> ModelMLPs:
    """Every MLP of ``model`` (not yet patched) with its tower, and every module with MLP weights that is left out."""
    mt = model_type(model)
    candidates, skipped, unrecognised = [], [], []
    for path, m in model.named_modules():
        if isinstance(m, FusedMLP):
            continue
        why = _experts(path, m)
        if why:
            skipped.append(Skipped(path, why, moe=True))
            continue
        layouts = _match_layouts(m) or _functional_layouts(m)
        if layouts:
            candidates.append((path, m, layouts))
        elif (why := _unrecognised(m)) is not None:
            unrecognised.append(Skipped(path, why))
    # a BERT-style MLP spans two children ("intermediate.dense", "output.dense"): those children are not left out
    covered = {f"{p}.{n.rpartition('.')[0]}".lstrip(".") for p, _, lays in candidates for lay, _ in lays
               for n in lay.linears if "." in n}
    found = [(p, kind) for p, _, lays in candidates for _, kind in lays]
    spec = MODEL_TABLE.get(mt)
    if spec is not None:
        (tower_of, roots), source = _table_towers(spec, mt), "MODEL_TABLE"
    else:
        (tower_of, roots), source = _infer_towers(model, mt, found), "inferred"
    for s in unrecognised:  # under a left-out tower (audio), that tower is the reason
        if s.name not in covered:
            tower, reason, _ = tower_of(s.name)
            skipped.append(s if tower is not None else Skipped(s.name, reason))
    mlps = []
    for path, m, layouts in candidates:
        tower, reason, root = tower_of(path)
        for layout, kind in layouts:
            name = path if len(layouts) == 1 else f"{path}.{layout.linears[-1]}"
            if tower is None:
                skipped.append(Skipped(name, reason))
                continue
            if re.search(r"(^|\.)experts(\.|$)", path):
                skipped.append(Skipped(name, "mixture-of-experts: an expert MLP sees only the tokens routed to it; "
                                             "per-expert statistics are not supported", moe=True))
                continue
            act = _fused_act(m, layout, kind) if len(layouts) == 1 else None
            own = {n.split(".")[0] for n in layout.linears} | {act}
            info = MLPInfo(name, m, kind, tower, act, layout.linears, path,
                           tuple(c for c, _ in m.named_children() if c not in own))
            if tower == "vision" and root is not None and _merges_into_projector(info, path[len(root):]):
                info.tower = "projector"
            mlps.append(info)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    skipped.sort(key=lambda s: order.get(s.name, order.get(s.name.rpartition(".")[0], 0)))
    return ModelMLPs(mt, mlps, skipped, roots, source)


def _merges_into_projector(info: MLPInfo, below_root: str) -> bool:
    """An MLP inside the vision tower that feeds the language model: it changes the width (a patch merger maps
    merged patches to the language model's width) or sits under a merger/projector/adapter/... module."""
    if info.in_linears[0].in_features != info.hidden:
        return True
    return any(w in part for part in below_root.split(".") for w in _PROJECTOR_WORDS)


def find_mlps(model: nn.Module) -> list[MLPInfo]:
    """Every MLP of ``model`` (not yet patched), with its tower, in module order."""
    found = inspect_model(model)
    if not found.mlps:
        listing = ("; ".join(f"{s.name}: {s.reason}" for s in found.skipped[:3])
                   or "no module holds the Linear layers of an MLP")
        raise UnsupportedModelError(
            f"model type {found.model_type!r} is not in manu_fast.adapters.MODEL_TABLE and no MLP was found in it "
            f"({listing}). If its MLPs use other Linear names, add them with register_mlp_layout(...); to place MLPs "
            f"in towers: {_register_call(found.model_type)}")
    return found.mlps


def fingerprint(model: nn.Module) -> dict:
    """What a statistics/mask file must match: model type and every MLP's name, kind, tower and sizes."""
    patch = get_patch(model)
    if patch is not None:
        layers = {n: {"kind": l.kind, "tower": patch.towers[n], "neurons": l.neurons, "hidden": l.hidden,
                      **compact_identity(l)} for n, l in patch.layers.items()}
    else:
        layers = {i.name: {"kind": i.kind, "tower": i.tower, "neurons": i.neurons, "hidden": i.hidden}
                  for i in find_mlps(model)}
    return {"model_type": model_type(model), "layers": layers}


_PLACEHOLDER = re.compile(r"^(image|video|audio)_(token|patch)_(id|index)$")
_TOKEN_KEY = re.compile(r"_(token|patch)_(id|index|ids)$")
_SPECIAL_WORDS = ("vision", "image", "video", "img", "boi", "eoi", "frame", "visual", "audio", "boa", "eoa")


def _config_token_entries(config, seen: set[int]):
    """(attribute, value) of every token-id attribute of ``config``, its ``attribute_map`` aliases (Molmo2's
    ``image_token_id`` -> ``image_patch_id``) and its sub-configs (Phi-4-multimodal's ``vision_config.image_token_id``)."""
    if id(config) in seen:
        return
    seen.add(id(config))
    for key, value in vars(config).items():
        if not key.startswith("_") and _TOKEN_KEY.search(key):
            yield key, value
    for alias, target in getattr(config, "attribute_map", {}).items():
        if _TOKEN_KEY.search(alias):
            yield alias, getattr(config, target, None)
    for _, sub in _sub_configs(config):
        yield from _config_token_entries(sub, seen)


def _processor_token_entries(processor):
    """(attribute, id) of a processor's token attributes: ``image_token_id`` ..., and token strings
    (``image_token = "<image>"``) looked up in its tokenizer."""
    tokenizer = getattr(processor, "tokenizer", processor)
    unk = getattr(tokenizer, "unk_token_id", None)
    for key, value in vars(processor).items():
        if key.startswith("_") or not re.search(r"_token(_id|_ids|_index)?$", key):
            continue
        if isinstance(value, str) and hasattr(tokenizer, "convert_tokens_to_ids"):
            value = tokenizer.convert_tokens_to_ids(value)
            if not isinstance(value, int) or value == unk:
                continue
        yield (key if _TOKEN_KEY.search(key) else f"{key}_id"), value


def token_ids(model: nn.Module, processor=None) -> dict[str, tuple[int, ...]]:
    """Language-model token ids of each non-text kind the config (and its sub-configs, and ``processor`` when given)
    names: the ``image``/``video``/``audio`` placeholders (``image_token_id``, ``image_token_index``,
    ``image_patch_id`` ...) and ``special`` boundary tokens (``vision_start_token_id``, ``boi_token_index``,
    ``image_end_token_id`` ...). Every other token is ``text``. A placeholder is never also ``special``; image and
    video may share one (Molmo2): the profiler labels it by the batch's pixels."""
    entries = list(_config_token_entries(model.config, set()))
    if processor is not None:
        entries += list(_processor_token_entries(processor))
    out: dict[str, set[int]] = {}
    for key, value in entries:
        if value is None:
            continue
        m = _PLACEHOLDER.match(key)
        kind = m.group(1) if m else "special" if any(w in key for w in _SPECIAL_WORDS) else None
        if kind is None:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        out.setdefault(kind, set()).update(int(v) for v in values if isinstance(v, int) and not isinstance(v, bool))
    placeholders = set().union(*(out.get(k, set()) for k in ("image", "video", "audio")))
    out["special"] = out.get("special", set()) - placeholders
    return {k: tuple(sorted(out[k])) for k in TOKEN_KINDS if out.get(k)}


def video_span_ids(model: nn.Module) -> tuple[int, int] | None:
    """(video_start_token_id, video_end_token_id) when the config names both: image placeholders between them are a
    video's frames (GLM-4.1V writes video frames with the image token)."""
    start, end = (getattr(model.config, f"video_{k}_token_id", None) for k in ("start", "end"))
    return (int(start), int(end)) if isinstance(start, int) and isinstance(end, int) else None


def default_token_kinds(model: nn.Module) -> tuple[str, ...]:
    """The token kinds profiled by default: image and text, plus every other kind the config names tokens of."""
    ids = token_ids(model)
    return tuple(k for k in TOKEN_KINDS if k in ("image", "text") or k in ids)


# ---------------------------------------------------------------------------------------------------- patching
@dataclass
class Patch:
    """The fused layers and MLP parts installed in a model, and what they replaced (for an exact undo)."""

    model: nn.Module
    layers: dict[str, NeuronLayer] = field(default_factory=dict)  # fused layers and MLP parts (``layer.part``)
    towers: dict[str, str] = field(default_factory=dict)
    originals: dict[str, nn.Module] = field(default_factory=dict)  # the HF modules the fused layers replaced

    def replace(self, name: str, layer: FusedMLP) -> None:
        """Install ``layer`` in place of the fused layer ``name`` (unpatch still restores the original HF module)."""
        if name not in self.layers:
            raise KeyError(f"no patched MLP named {name!r}")
        if self.layers[name].part:
            raise ValueError(f"{name!r} is an MLP part (hooks in a larger module), not a fused layer: it cannot be "
                             "replaced")
        _set_submodule(self.model, name, layer)
        self.layers[name] = layer

    def unpatch(self) -> None:
        for name, orig in self.originals.items():
            _set_submodule(self.model, name, orig)
        for layer in self.layers.values():
            if layer.part:
                layer.remove_hooks()
        self.layers.clear()
        self.originals.clear()
        self.model.__dict__.pop("_manu_fast_patch", None)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def forward_kwargs(model: nn.Module) -> dict:
    """Cheap extras for a statistics-only forward: no KV cache, logits for the last position only."""
    params = inspect.signature(model.forward).parameters
    extra = {}
    if "use_cache" in params:
        extra["use_cache"] = False
    if "logits_to_keep" in params:
        extra["logits_to_keep"] = 1
    return extra


def get_patch(model: nn.Module) -> Patch | None:
    return model.__dict__.get("_manu_fast_patch")


def _fused_layer(info: MLPInfo) -> FusedMLP:
    m = info.module
    act = getattr(m, info.act_attr)
    if info.kind == "gated":
        gate, up, down = info.linears
        return FusedGatedMLP(getattr(m, gate), getattr(m, up), getattr(m, down), act, info.act_attr)
    fc1, fc2 = info.linears
    return FusedPlainMLP(getattr(m, fc1), getattr(m, fc2), act, fc1, fc2, info.act_attr)


@contextmanager
def _hooks_suspended(module: nn.Module):
    """Run without the forward hooks of ``module`` and its submodules (users' hooks must not see the probe)."""
    saved = [(m, dict(m._forward_pre_hooks), dict(m._forward_hooks)) for m in module.modules()]
    for m, _, _ in saved:
        m._forward_pre_hooks.clear()
        m._forward_hooks.clear()
    try:
        yield
    finally:
        for m, pre, post in saved:
            m._forward_pre_hooks.update(pre)
            m._forward_hooks.update(post)


# Probe verdicts per module class, activation class and layout: a class's forward is the same code for every
# instance, so one probe serves all its layers (a 7B model has 3 MLP classes and 57 MLPs) and later patches.
_PROBE_VERDICTS: dict[tuple, bool] = {}


def _computes_the_same(original: nn.Module, fused: FusedMLP, info: MLPInfo) -> bool:
    """Whether ``original``'s class computes what the fused layer does, probed once per (module class, activation
    class, layout) and remembered (see ``_probe``)."""
    key = (type(original), type(getattr(original, info.act_attr)), info.kind, tuple(info.linears))
    if key not in _PROBE_VERDICTS:
        verdict = _probe(original, fused)
        if verdict is None:  # could not run (weights on 'meta', not floating point): trust the structure, this time
            return True
        _PROBE_VERDICTS[key] = verdict
    return _PROBE_VERDICTS[key]


@torch.no_grad()
def _probe(original: nn.Module, fused: FusedMLP) -> bool | None:
    """Whether ``original`` computes what the fused layer does, on a 2-token probe input run with forward hooks
    suspended (None when it cannot be run: weights on 'meta', or not floating point)."""
    w = fused.out_linear.weight
    if w.device.type == "meta" or not w.is_floating_point():
        return None
    x = torch.randn(2, fused.in_linears[0].in_features, generator=torch.Generator().manual_seed(0))
    x = x.to(device=w.device, dtype=w.dtype)
    try:
        with _hooks_suspended(original):
            a, b = original(x), fused(x)
    except Exception:  # noqa: BLE001 -- a forward that needs more than one tensor is not a plain MLP
        return False
    if not isinstance(a, torch.Tensor) or a.shape != b.shape:
        return False
    a, b = a.float(), b.float()
    finite = a[torch.isfinite(a)]  # a weight of +-inf (or NaN) must not make the tolerance NaN
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=1e-3, atol=1e-3 * scale + 1e-6, equal_nan=True))


def _moe_error(mt: str, moe: list[Skipped]) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"model type {mt!r} has mixture-of-experts layers: {moe[0].name} ({moe[0].reason})"
        f"{f' and {len(moe) - 1} more' if len(moe) > 1 else ''}. Call manu_fast.adapters.patch_model(model, "
        "moe='skip') before profiling to patch the other MLPs (shared experts, dense layers, vision tower) and "
        "leave the experts out")


def patch_model(model: nn.Module, moe: str = "refuse") -> Patch:
    """Patch every MLP of ``model`` in place: whole MLP modules become fused layers sharing the original weights,
    MLPs inside larger modules get hooks (``MLPPart``). Idempotent; ``Patch.unpatch()`` restores the model exactly.

    ``moe``: ``"refuse"`` (default) raises UnsupportedModelError naming the mixture-of-experts layers; ``"skip"``
    patches everything else and warns. Other modules left out (audio towers, unrecognised MLP-like modules) are
    named in a warning; ``inspect_model`` / ``manu-fast report MODEL_DIR`` list them with the reason.
    """
    if moe not in MOE_POLICIES:
        raise ValueError(f"moe must be one of {MOE_POLICIES}, got {moe!r}")
    patch = get_patch(model)
    if patch is not None:
        return patch
    found = inspect_model(model)
    moe_skipped = [s for s in found.skipped if s.moe]
    if moe_skipped and moe == "refuse":
        raise _moe_error(found.model_type, moe_skipped)
    if not found.mlps:
        find_mlps(model)  # raises the error that says what was found
    if found.skipped:
        warnings.warn(f"manu_fast.patch_model: {len(found.skipped)} modules with MLP weights are not patched: "
                      + "; ".join(f"{s.name}: {s.reason}" for s in found.skipped[:3])
                      + (" ..." if len(found.skipped) > 3 else "")
                      + " (inspect_model(model) or `manu-fast report MODEL_DIR` lists them all)", stacklevel=2)
    patch = Patch(model)
    for info in found.mlps:
        m = info.module
        layer = None
        if info.act_attr is not None:
            fused = _fused_layer(info)
            fused.train(m.training)
            hook = getattr(m, "_hf_hook", None)
            if hook is not None:  # accelerate device_map/offload hook on the MLP itself: it moves the MLP's inputs
                from accelerate.hooks import add_hook_to_module
                add_hook_to_module(fused, hook)
            if _computes_the_same(m, fused, info):
                layer = fused
                _set_submodule(model, info.name, fused)
                patch.originals[info.name] = m
        if layer is None:
            layer = MLPPart(info.kind, info.in_linears, info.out_linear)
        patch.layers[info.name] = layer
        patch.towers[info.name] = info.tower
    model.__dict__["_manu_fast_patch"] = patch
    return patch
