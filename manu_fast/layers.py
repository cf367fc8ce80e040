"""Drop-in fused MLP layers: the HF MLP's forward, plus neuron masks and in-pass statistics.

The layers reuse the HF ``nn.Linear`` children under their original names (state_dict keys are unchanged,
no weight is copied) and the original activation module, so with no mask and no profiler attached the
forward is the HF forward, bit for bit. With a mask or a profiler attached the intermediate goes through
the fused op (``manu_fast.ops``): activation, mask and statistics in one pass.
"""
from __future__ import annotations

import hashlib
from typing import Protocol

import torch
from torch import nn

from .activations import activation_name
from .ops import act_stats, gated_linear_act_stats


class Recorder(Protocol):
    """What a layer's ``recorder`` (attached by ``manu_fast.profiler.Profiler`` while profiling) must provide."""

    def op_kwargs(self, layer: "FusedMLP", num_tokens: int) -> dict:
        """The op's statistics arguments for a call over ``num_tokens`` tokens (``group_ids``, ``stats``,
        ``pre_stats``, ``up_stats``, ``tau``), or {} when this call is not profiled."""

    def record_output(self, layer: "FusedMLP", y: torch.Tensor) -> None:
        """Statistics of the MLP's output (site 'out')."""

    def record_input(self, layer: "FusedMLP", site: str, a: torch.Tensor) -> None:
        """Statistics of an MLP part's input Linear output (site 'pre' or 'up')."""


class Widths:
    """``neurons`` and ``hidden`` of an MLP read from its output Linear (``out_linear``): shared by the patched
    layers and ``adapters.MLPInfo``, which describes an MLP before it is patched."""

    @property
    def neurons(self) -> int:
        return self.out_linear.in_features

    @property
    def hidden(self) -> int:
        """The MLP's input/output width (the residual stream)."""
        return self.out_linear.out_features


class NeuronLayer(Widths):
    """What every patched MLP is: ``neurons`` hidden units between its input Linears (``in_linears``, whose output
    row j feeds neuron j) and its output Linear (``out_linear``, whose input column j is neuron j), with named
    reversible masks and a profiler hook point (``recorder``). Two kinds share it: ``FusedMLP``, a drop-in module
    that replaces the HF MLP, and ``MLPPart``, hooks on the Linears of an MLP that stays inside its own module
    (``part`` tells them apart)."""

    kind: str
    part: bool

    def _init_masks(self, act_name: str) -> None:
        self.act_name = act_name
        self._masks: dict[str, torch.Tensor] = {}
        self._out_masks: dict[str, torch.Tensor] = {}  # masks of the MLP's output channels (down_proj/fc2 rows)
        self._enabled: set[str] = set()
        self.recorder: Recorder | None = None  # set by manu_fast.profiler.Profiler while profiling
        self.origin: torch.Tensor | None = None  # a compact copy's map to the original numbering (compact_identity)
        self.origin_neurons: int | None = None  # ... and the original layer's width

    @property
    def execution_device(self) -> torch.device:
        """Where the layer computes: its weights' device or, for weights offloaded by accelerate (on "meta"
        until a hook loads them), the hook's execution device."""
        dev = self.out_linear.weight.device
        if dev.type != "meta":
            return dev
        for module in (self.out_linear, self, *self.in_linears):
            hook_dev = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
            if hook_dev is not None:
                return torch.device(f"cuda:{hook_dev}" if isinstance(hook_dev, int) else hook_dev)
        raise ValueError("an MLP's weights are on the 'meta' device with no accelerate hook to load them: load the "
                         "model's weights (or dispatch it with accelerate) before profiling or masking")

    # ---- reversible masks (O(N), no weight copy) ----
    def set_mask(self, name: str, keep: torch.Tensor | None, enabled: bool = True, *,
                 out_keep: torch.Tensor | None = None) -> None:
        """Mask ``name``: ``keep`` (neurons,) over the neurons h and/or ``out_keep`` (hidden,) over the
        output channels (zeroed after out_linear, as if its rows were zero); True = kept."""
        if keep is None and out_keep is None:
            raise ValueError(f"mask {name!r} needs keep and/or out_keep")
        for what, vec, n in (("neurons", keep, self.neurons), ("output channels", out_keep, self.hidden)):
            if vec is not None and torch.as_tensor(vec).shape != (n,):
                raise ValueError(f"mask {name!r} has shape {tuple(torch.as_tensor(vec).shape)}, this layer has {n} {what}")
        self._masks.pop(name, None)
        self._out_masks.pop(name, None)
        if keep is not None:
            self._masks[name] = torch.as_tensor(keep).to(device=self.execution_device, dtype=torch.bool)
        if out_keep is not None:
            self._out_masks[name] = torch.as_tensor(out_keep).to(device=self.execution_device, dtype=torch.bool)
        self.enable_mask(name, enabled)

    def remove_mask(self, name: str) -> None:
        self._masks.pop(name, None)
        self._out_masks.pop(name, None)
        self._enabled.discard(name)
        self._refresh_keep()

    def enable_mask(self, name: str, enabled: bool = True) -> None:
        if name not in self._masks and name not in self._out_masks:
            raise KeyError(f"no mask named {name!r} on this layer (have: {self.mask_names()})")
        (self._enabled.add if enabled else self._enabled.discard)(name)
        self._refresh_keep()

    def mask_names(self) -> list[str]:
        return sorted({*self._masks, *self._out_masks})

    def _refresh_keep(self) -> None:
        self.keep = self.out_keep = None
        for name in sorted(self._enabled):
            if name in self._masks:
                self.keep = self._masks[name] if self.keep is None else self.keep & self._masks[name]
            if name in self._out_masks:
                self.out_keep = self._out_masks[name] if self.out_keep is None else self.out_keep & self._out_masks[name]

    # ---- forward ----
    def _op_kwargs(self, x: torch.Tensor) -> dict | None:
        """The op's keyword arguments for this call (mask, and group ids + accumulators while profiling), or
        None when neither a mask nor a profiler is attached (the layer then runs the plain HF forward)."""
        rec, keep = self.recorder, self.keep
        kw = rec.op_kwargs(self, x.shape[:-1].numel()) if rec is not None else {}
        if not kw and keep is None:
            return None
        return {"act": self.act_name, "keep": keep, **kw}

    def _output(self, y: torch.Tensor) -> torch.Tensor:
        if self.out_keep is not None:
            y = torch.where(self.out_keep, y, 0)
        rec = self.recorder
        if rec is not None:
            rec.record_output(self, y)
        return y


class FusedMLP(NeuronLayer, nn.Module):
    """Common part of the gated and plain fused MLPs: a module that replaces the HF MLP, reusing its Linears and
    activation module as children (state_dict keys unchanged); masks live in non-persistent buffers."""

    part = False

    def _init_common(self, act_module: nn.Module, act_attr: str):
        self.act_attr = act_attr
        self.add_module(act_attr, act_module)
        self.register_buffer("keep", None, persistent=False)
        self.register_buffer("out_keep", None, persistent=False)
        self._init_masks(activation_name(act_module))

    def compact(self) -> "FusedMLP":
        """A smaller copy without the masked neurons (same outputs, less work), its width rounded up to a multiple
        of COMPACT_MULTIPLE with zero neurons (``compact_width``); see docs/OPS.md, section 5."""
        return _compact(self)


class FusedGatedMLP(FusedMLP):
    """``down_proj(act(gate_proj(x)) * up_proj(x))`` (Llama, Mistral, Qwen2, Idefics2 connector, Qwen2.5-VL vision)."""

    kind = "gated"

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear, act_module: nn.Module,
                 act_attr: str = "act_fn"):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self._init_common(act_module, act_attr)

    @property
    def in_linears(self) -> list[nn.Linear]:
        return [self.gate_proj, self.up_proj]

    @property
    def out_linear(self) -> nn.Linear:
        return self.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_proj, self.up_proj
        kw = self._op_kwargs(x)
        if kw is None:
            h = getattr(self, self.act_attr)(g(x)) * u(x)
        elif _plain_linear(g) and _plain_linear(u):
            h = gated_linear_act_stats(x, g.weight, g.bias, u.weight, u.bias, **kw)
        else:  # the projections must run as modules (quantised Linear subclasses, accelerate or user hooks)
            h = act_stats(g(x), u(x), **kw)
        return self._output(self.down_proj(h))


class FusedPlainMLP(FusedMLP):
    """``fc2(act(fc1(x)))`` (CLIP / SigLIP / Idefics vision MLPs, LLaVA projector, Qwen2-VL vision)."""

    kind = "plain"

    def __init__(self, fc1: nn.Linear, fc2: nn.Linear, act_module: nn.Module, fc1_name: str = "fc1",
                 fc2_name: str = "fc2", act_attr: str = "activation_fn"):
        super().__init__()
        self.fc1_name, self.fc2_name = fc1_name, fc2_name
        self.add_module(fc1_name, fc1)
        self.add_module(fc2_name, fc2)
        self._init_common(act_module, act_attr)

    @property
    def in_linears(self) -> list[nn.Linear]:
        return [getattr(self, self.fc1_name)]

    @property
    def out_linear(self) -> nn.Linear:
        return getattr(self, self.fc2_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.in_linears[0](x)
        kw = self._op_kwargs(x)
        h = getattr(self, self.act_attr)(f) if kw is None else act_stats(f, **kw)
        return self._output(self.out_linear(h))


def _plain_linear(m: nn.Module) -> bool:
    """An nn.Linear whose weights the op may use directly: exactly the class, no hook that would change the call."""
    return type(m) is nn.Linear and not hasattr(m, "_hf_hook") and not m._forward_hooks and not m._forward_pre_hooks


# Compact layers keep their width a multiple of this: GEMMs at odd inner widths are several times slower
# (docs/OPS.md, section 5: on an H200, bf16 GEMMs at 10788 kept neurons ran 2.8x slower than at 10816).
COMPACT_MULTIPLE = 64


def compact_width(kept: int, total: int) -> int:
    """Width of the compact copy of a layer with ``total`` neurons of which ``kept`` are kept: ``kept`` rounded up
    to a multiple of COMPACT_MULTIPLE (the extra neurons are zero), never more than ``total``."""
    return min(-(-kept // COMPACT_MULTIPLE) * COMPACT_MULTIPLE, max(total, kept))


def _compact_linear(lin: nn.Linear, idx: torch.Tensor, dim: int, width: int) -> nn.Linear:
    """A copy of ``lin`` keeping the neurons ``idx`` along ``dim`` (0: output rows, 1: input columns), padded
    with zero neurons to ``width``; the bias follows the rows (dim 0) or stays whole (dim 1)."""
    w = lin.weight.detach()
    shape = list(w.shape)
    shape[dim] = width
    new = nn.Linear(shape[1], shape[0], bias=lin.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight.narrow(dim, 0, idx.numel()).copy_(w.index_select(dim, idx))
        if lin.bias is not None:
            if dim == 1:
                new.bias.copy_(lin.bias)
            else:
                new.bias.zero_()
                new.bias[: idx.numel()] = lin.bias.detach().index_select(0, idx)
    return new


def _compact(layer: FusedMLP) -> FusedMLP:
    """A smaller copy of ``layer`` without its masked neurons (same outputs, less work), its width padded with
    zero neurons to ``compact_width``: a zero neuron adds exactly nothing (act(0) * 0 = 0, zero column)."""
    if layer.keep is None:
        raise ValueError("layer has no active mask to compact")
    idx = layer.keep.nonzero().flatten()
    width = compact_width(idx.numel(), layer.neurons)
    act_module = getattr(layer, layer.act_attr)
    if layer.kind == "gated":
        new = FusedGatedMLP(_compact_linear(layer.gate_proj, idx, 0, width),
                            _compact_linear(layer.up_proj, idx, 0, width),
                            _compact_linear(layer.down_proj, idx, 1, width), act_module, layer.act_attr)
    else:
        new = FusedPlainMLP(_compact_linear(layer.in_linears[0], idx, 0, width),
                            _compact_linear(layer.out_linear, idx, 1, width), act_module, layer.fc1_name,
                            layer.fc2_name, layer.act_attr)
    if layer.out_keep is not None:  # output channels are not dropped: their mask stays
        new.set_mask("output", None, out_keep=layer.out_keep)
    base = layer.origin if layer.origin is not None else torch.arange(layer.neurons)
    new.origin = torch.full((width,), -1, dtype=torch.int64)
    new.origin[: idx.numel()] = base[idx.cpu()]
    new.origin_neurons = layer.origin_neurons or layer.neurons
    return new


def compact_identity(layer: FusedMLP) -> dict:
    """The fingerprint entries that tell a compact copy from the layer it came from (empty for an original layer):
    ``compacted`` = the original width and a SHA-256 of the kept neurons' original indices. Compaction always
    changes it, even when the rounded width equals the original one (the neurons are renumbered), so that files in
    the other numbering are refused (``manu_fast.masks.translate_masks`` converts masks)."""
    if layer.origin is None:
        return {}
    digest = hashlib.sha256(layer.origin.numpy().tobytes()).hexdigest()
    return {"compacted": {"of": int(layer.origin_neurons), "kept_sha256": digest}}


class MLPPart(NeuronLayer):
    """An MLP that stays inside its own module, patched by hooks instead of replaced.

    For MLPs the fused layers cannot stand in for: the MLP part of a larger module (a projector that also holds a
    norm and a patch merger, a decoder layer holding fc1/fc2 itself), one Linear computing gate and up together
    (``kind == "gate_up"``), or an activation the fused op lacks. The neurons are the input features of the output
    Linear ``out_linear``: a forward pre-hook there masks and profiles them (the op with the identity activation: the
    owner has computed ``h`` already), a forward hook profiles the output ('out' site), and forward hooks on
    the input Linears profile the 'pre'/'up' sites (none for "gate_up"). The owner's forward runs unchanged; the
    object is not a module of the model, so parameters and state_dict keys do not change.
    """

    part = True

    def __init__(self, kind: str, in_linears: list[nn.Linear], out_linear: nn.Linear):
        self.kind = kind
        self.keep: torch.Tensor | None = None
        self.out_keep: torch.Tensor | None = None
        self._init_masks("identity")  # the owner computes h itself: the op only masks and profiles it
        self._linears = (tuple(in_linears), out_linear)  # the model's modules (this object is not a module)
        self._handles = [out_linear.register_forward_pre_hook(self._on_hidden),
                         out_linear.register_forward_hook(self._on_output)]
        if kind != "gate_up":
            for site, lin in zip(("pre", "up"), in_linears):
                self._handles.append(lin.register_forward_hook(
                    lambda module, args, out, site=site: self._on_input(site, out)))

    @property
    def in_linears(self) -> list[nn.Linear]:
        """Input Linears whose output row j feeds neuron j (none for a fused gate_up Linear)."""
        return [] if self.kind == "gate_up" else list(self._linears[0])

    @property
    def out_linear(self) -> nn.Linear:
        return self._linears[1]

    def _on_hidden(self, linear, args):
        kw = self._op_kwargs(args[0])
        return None if kw is None else (act_stats(args[0], None, **kw), *args[1:])

    def _on_output(self, linear, args, y):
        return self._output(y)

    def _on_input(self, site: str, y: torch.Tensor) -> None:
        if self.recorder is not None:
            self.recorder.record_input(self, site, y)

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def compact(self) -> "FusedMLP":
        raise ValueError("an MLP part (hooks inside a larger module) cannot be compacted; its mask stays applied")
