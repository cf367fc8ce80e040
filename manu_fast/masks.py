"""Neuron masks: the container, its safetensors file, reversible masks on fused layers, permanent pruning.

A ``Masks`` holds, for each MLP layer, a ``keep`` vector (True = neuron kept) for one **site**:

- ``"hidden"`` (default): the MLP intermediate neuron ``h`` (input of down_proj / fc2). Pruning neuron j
  zeroes row j of gate_proj/up_proj/fc1 (and bias) and column j of down_proj/fc2.
- ``"pre"`` / ``"up"``: the outputs of gate_proj/fc1 (pre-activation) / up_proj, the official MANU code's
  convention (it hooks Linear outputs). Pruning zeroes the output row j of that Linear (weight row and
  bias). Since every supported activation has act(0) = 0, this also zeroes h_j, so these masks can be
  applied reversibly as hidden masks.
- ``"out"``: the MLP output (outputs of down_proj/fc2, length = hidden size). Pruning zeroes output row
  j of down_proj/fc2 (weight row and bias); reversibly, the fused layer zeroes output channel j.
- ``"linear"``: output rows of several Linears of a layer at once, ``keep["layer::pre" | "layer::up" |
  "layer::out"]`` (``row_key``): what ``manu-official`` prunes (fc1 and fc2 rows, gate, up and down rows).
  Pruning zeroes each row (weight row and bias); reversibly, pre/up rows become a mask of h and out rows a mask
  of the output channels.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field

import torch

from .adapters import fingerprint, get_patch, patch_model
from .io import check_fingerprint_fields, load_tensors, parse_json, save_tensors
from .schema import LINEAR_ROW_SITES, MASK_SITES, SITES, StatsFileError, check_fingerprint, in_tower_order, layer_sites, site_length  # noqa: F401

FORMAT = "manu_fast.masks/1"


def row_key(layer: str, site: str) -> str:
    """The key of one Linear's output rows in masks of site ``"linear"``."""
    return f"{layer}::{site}"


def _entry(layers: dict, key: str, site: str) -> tuple[str, str, int]:
    """(layer, site, length) of one keep entry of masks at ``site``."""
    if site not in MASK_SITES:
        raise ValueError(f"unknown mask site {site!r}; expected one of {MASK_SITES}")
    layer, sub = key, site
    if site == "linear":
        layer, _, sub = key.partition("::")
        if sub not in LINEAR_ROW_SITES:
            raise ValueError(f"a 'linear' mask entry is named 'layer::site' with site in {LINEAR_ROW_SITES}, got {key!r}")
    if layer not in layers:
        raise ValueError(f"mask for layer {layer!r}, which the model fingerprint does not have")
    return layer, sub, site_length(layers[layer], sub)


@dataclass
class Masks:
    """``keep[layer]`` is a bool (N,) tensor on the CPU (True = kept) for the layers of one model at one site
    (site ``"linear"``: ``keep[row_key(layer, site)]``, see the module docstring).

    Layers absent from ``keep`` are left untouched. ``fingerprint`` is the model's
    (``manu_fast.adapters.fingerprint``); ``description`` records how the masks were made (strategy, alpha...).
    """

    keep: dict[str, torch.Tensor]
    fingerprint: dict
    site: str = "hidden"
    description: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.fingerprint, dict) or not isinstance(self.fingerprint.get("layers"), dict):
            raise TypeError("Masks: fingerprint must be a model fingerprint {'model_type': ..., 'layers': {...}} "
                            "(manu_fast.adapters.fingerprint)")
        if not isinstance(self.keep, dict):
            raise TypeError(f"Masks: keep must be a dict {{layer: bool tensor}}, got {type(self.keep).__name__}")
        layers = self.fingerprint["layers"]
        checked = {}
        for name, k in self.keep.items():
            k = torch.as_tensor(k)
            n = _entry(layers, name, self.site)[2]
            if k.dtype != torch.bool or k.shape != (n,):
                raise ValueError(f"mask of layer {name!r} must be bool of shape ({n},), got {k.dtype} {tuple(k.shape)}")
            checked[name] = k.detach().cpu()
        self.keep = checked

    @classmethod
    def all_kept(cls, fingerprint: dict, site: str = "hidden", layers=None) -> "Masks":
        """Masks that keep every neuron of ``layers`` (default: every layer of the fingerprint that has ``site``)."""
        info = fingerprint["layers"]
        if layers is None:
            # a plain MLP has no 'up' (skipped); a gate_up layer has no 'pre' of its own (refused by site_length)
            layers = [n for n, i in info.items() if site != "up" or "up" in layer_sites(i)]
        return cls({n: torch.ones(site_length(info[n], site), dtype=torch.bool) for n in layers}, fingerprint, site)

    def tower(self, layer: str) -> str:
        """The tower of a keep entry (a layer, or ``layer::site`` of a "linear" mask)."""
        return self.fingerprint["layers"][layer.partition("::")[0]].get("tower", "unknown")

    def _layers(self, tower):
        return [n for n in self.keep if tower is None or self.tower(n) == tower]

    def num_pruned(self, tower: str | None = None) -> int:
        """Number of pruned entries, over every masked layer or those of one tower."""
        return sum(int((~self.keep[n]).sum()) for n in self._layers(tower))

    def num_total(self, tower: str | None = None) -> int:
        return sum(self.keep[n].numel() for n in self._layers(tower))

    def fraction(self, tower: str | None = None) -> float:
        """Pruned fraction of the masked layers (of one tower); 0.0 when there are none."""
        total = self.num_total(tower)
        return self.num_pruned(tower) / total if total else 0.0

    def by_tower(self) -> dict[str, tuple[int, int]]:
        """tower -> (pruned, total), in the model's order (vision, projector, language; others after)."""
        return {t: (self.num_pruned(t), self.num_total(t)) for t in in_tower_order(map(self.tower, self.keep))}

    def pruned_indices(self, layer: str) -> torch.Tensor:
        return (~self.keep[layer]).nonzero().flatten()

    def combine(self, other: "Masks") -> "Masks":
        """AND of two masks of the same model and site: a neuron is kept only if both keep it."""
        check_fingerprint(self.fingerprint, other.fingerprint)
        if other.site != self.site:
            raise ValueError(f"cannot combine masks of site {self.site!r} with masks of site {other.site!r}")
        keep = dict(self.keep)
        for n, k in other.keep.items():
            keep[n] = keep[n] & k if n in keep else k
        return Masks(keep, self.fingerprint, self.site, {"combined": [self.description, other.description]})

    __and__ = combine

    def save(self, path) -> None:
        """Write to ``path`` atomically in safetensors (bool tensors + JSON metadata, no pickle)."""
        meta = {"format": FORMAT, "site": self.site, "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
                "description": json.dumps(self.description, sort_keys=True, default=str)}
        save_tensors({n: k.contiguous() for n, k in self.keep.items()}, path, meta)

    @classmethod
    def load(cls, path, expect_fingerprint: dict | None = None) -> "Masks":
        """Read a masks file; refuse (StatsFileError) a damaged file or one made for another model."""
        tensors, meta = load_tensors(path, FORMAT, "masks")
        fp = check_fingerprint_fields(parse_json(meta.get("fingerprint"), path, "fingerprint"), path)
        description = parse_json(meta.get("description", "{}"), path, "description")
        if not isinstance(description, dict):
            raise StatsFileError(f"{path}: metadata field 'description' must be an object")
        site = meta.get("site")
        if site not in MASK_SITES:
            raise StatsFileError(f"{path}: metadata field 'site' must be one of {MASK_SITES}, got {str(site)[:40]}")
        if expect_fingerprint is not None:
            check_fingerprint(expect_fingerprint, fp, path)
        try:
            return cls(tensors, fp, site, description)
        except (ValueError, KeyError) as e:
            raise StatsFileError(f"{path}: {e}") from None


def _check_masks(masks) -> None:
    if not isinstance(masks, Masks):
        raise TypeError(f"masks must be a manu_fast.masks.Masks (Masks.load(path)), got {type(masks).__name__}")


def apply_masks(model, masks: Masks, name: str = "forget"):
    """Set ``masks`` on the model's fused layers as the reversible mask ``name`` (O(N) per layer, no weight copy).

    Patches the model first if needed (``manu_fast.adapters.patch_model``) and returns the Patch. Several
    names compose (a neuron is active only if every enabled mask keeps it); ``remove_masks`` undoes one.
    """
    _check_masks(masks)
    check_fingerprint(fingerprint(model), masks.fingerprint, "masks")
    patch = patch_model(model, moe="skip")  # masks never hold experts (they are never profiled)
    layers = masks.fingerprint["layers"]
    hidden: dict[str, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for key, keep in masks.keep.items():  # a 'pre'/'up' row zeroes h too: act(0) == 0 for every supported activation
        layer, site, _ = _entry(layers, key, masks.site)
        if site == "out":
            out[layer] = keep
        else:
            hidden[layer] = hidden[layer] & keep if layer in hidden else keep
    for layer in dict.fromkeys([*hidden, *out]):
        patch.layers[layer].set_mask(name, hidden.get(layer), out_keep=out.get(layer))
    return patch


def remove_masks(model, name: str = "forget") -> None:
    """Remove the reversible mask ``name`` from every fused layer that has it."""
    patch = get_patch(model)
    holders = [] if patch is None else [layer for layer in patch.layers.values() if name in layer.mask_names()]
    if not holders:
        raise ValueError(f"the model has no mask named {name!r}")
    for layer in holders:
        layer.remove_mask(name)


def _check_materialised(linear) -> None:
    if linear.weight.device.type == "meta":
        raise ValueError("prune_weights needs the weights in memory: this model's weights are offloaded (on the 'meta' "
                         "device); load it without offloading, or apply the masks reversibly with apply_masks")


@torch.no_grad()
def _zero_rows(linear, rows: torch.Tensor) -> None:
    _check_materialised(linear)
    rows = rows.to(linear.weight.device)
    linear.weight[rows] = 0
    if linear.bias is not None:
        linear.bias[rows] = 0


@torch.no_grad()
def prune_weights(model, masks: Masks) -> None:
    """Permanently zero the weights of pruned entries (see the module docstring for each site).

    Works on a stock HF model or a patched one; afterwards ``save_pretrained`` / ``from_pretrained`` with
    stock transformers reproduces the pruned outputs (the weights are zero; no custom module is needed).
    """
    _check_masks(masks)
    check_fingerprint(fingerprint(model), masks.fingerprint, "masks")
    owned = get_patch(model) is None
    patch = patch_model(model, moe="skip")  # fused layers and parts use the HF Linears: zeroing them zeroes the model's
    try:
        for key, keep in masks.keep.items():
            layer, site, _ = _entry(masks.fingerprint["layers"], key, masks.site)
            fused = patch.layers[layer]
            idx = (~keep).nonzero().flatten()
            if site == "hidden":
                for lin in fused.in_linears:
                    _zero_rows(lin, idx)
                _check_materialised(fused.out_linear)
                fused.out_linear.weight[:, idx.to(fused.out_linear.weight.device)] = 0
            elif site == "out":
                _zero_rows(fused.out_linear, idx)
            else:
                _zero_rows(fused.in_linears[0 if site == "pre" else 1], idx)
    finally:
        if owned:
            patch.unpatch()


def translate_masks(masks: Masks, model) -> Masks:
    """Hidden-site ``masks`` moved across compaction with the map ``compact_model`` keeps on the compact layers of
    ``model`` (a compacted model): masks of the full model into the compact numbering, or masks made on the compacted
    model back into the original numbering (for the full model, after ``Patch.unpatch()``; the neurons compaction
    dropped stay pruned there). Masks that fit neither side are refused (StatsFileError)."""
    if masks.site != "hidden":
        raise ValueError(f"only hidden-site masks can be translated across compaction, these are of site {masks.site!r}")
    patch = get_patch(model)
    compact = {n: l for n, l in (patch.layers.items() if patch is not None else ()) if l.origin is not None}
    if not compact:
        raise ValueError("the model has no compacted layers: there is nothing to translate masks across")
    here = fingerprint(model)
    full = {**here, "layers": {n: {**{k: v for k, v in i.items() if k != "compacted"}, "neurons": compact[n].origin_neurons}
                               if n in compact else i for n, i in here["layers"].items()}}
    to_compact = masks.fingerprint == full
    if not to_compact:
        check_fingerprint(here, masks.fingerprint, "masks (neither of the full model nor of this compacted one)")
    keep = {}
    for name, k in masks.keep.items():
        if name not in compact:
            keep[name] = k
            continue
        origin = compact[name].origin
        used = origin >= 0
        if to_compact:  # each compact neuron takes its original neuron's flag; padding neurons (zero) stay kept
            new = torch.ones(origin.numel(), dtype=torch.bool)
            new[used] = k[origin[used]]
        else:  # each original neuron takes its compact copy's flag; dropped neurons stay pruned
            new = torch.zeros(compact[name].origin_neurons, dtype=torch.bool)
            new[origin[used]] = k[used]
        keep[name] = new
    return Masks(keep, here if to_compact else full, masks.site, {"translated": masks.description})


def compact_model(model) -> int:
    """Drop the masked neurons of every fused layer from its weights (docs/OPS.md, section 5, "compact"), so that
    the MLPs do less work at inference; returns how many masked neurons were dropped.

    The compact layers hold new, smaller weight copies and no mask; each width is rounded up to a multiple of 64
    with zero neurons (``manu_fast.layers.compact_width``), which keeps the GEMMs at GEMM-friendly widths. MLP parts
    (hooks inside a larger module, ``manu_fast.layers.MLPPart``) are not compacted (a warning names them); their
    masks stay applied. ``Patch.unpatch()`` still restores the full original model. Statistics and masks of the full
    model no longer fit the compacted one: its fingerprint always changes (``manu_fast.layers.compact_identity``), even
    when the rounded width equals the original, and ``translate_masks`` converts masks between the two numberings.
    """
    patch = get_patch(model)
    if patch is None:
        raise ValueError("the model has no fused layers: apply_masks(model, masks) first, then compact")
    dropped, parts = 0, []
    for name, layer in list(patch.layers.items()):
        if layer.keep is not None and layer.part:  # an MLP part: hooks inside a larger module
            parts.append(name)
        elif layer.keep is not None:
            dropped += int((~layer.keep).sum())
            patch.replace(name, layer.compact())
    if parts:
        warnings.warn(f"manu_fast.compact_model: {len(parts)} masked MLPs live inside larger modules ({parts[0]} ...) "
                      "and are not compacted; their masks stay applied", stacklevel=2)
    return dropped
