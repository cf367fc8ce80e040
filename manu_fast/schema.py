"""The vocabulary every part of manu_fast agrees on, in one module that imports nothing of the package.

- statistics fields (``FIELDS``), the default activity threshold, group labels;
- profiling/mask sites (``SITES``) and the width of each site of a layer;
- the error raised for unusable statistics/mask files, and the model-fingerprint comparison;
- the unfused form of the gated op that every backend can run (``linear_then_act_stats``);
- the raw argument contract of the op backends (``check_backend_args``): the cheap checks that a compiled
  backend (C++ on raw pointers, Triton) runs before it touches memory. User-facing validation and conversion
  happen once, at the op boundary (``manu_fast.ops``); these checks only guarantee that a backend called
  directly with bad arguments raises instead of reading or writing out of bounds.

See docs/OPS.md for the op contract and the meaning of every field.
"""
from __future__ import annotations

import torch

from .activations import ACT_CODES

FIELDS = ("count", "mean", "m2", "sum_abs", "sum_sq", "active", "nonfinite")
F = {name: i for i, name in enumerate(FIELDS)}
NUM_FIELDS = len(FIELDS)
DEFAULT_TAU = 0.1
SITES = ("hidden", "pre", "up", "out")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class StatsFileError(ValueError):
    """A statistics or mask file that cannot be used (corrupt, wrong format, other model)."""


def group_label(split: str, modality: str, kind: str) -> str:
    return f"{split}/{modality}/{kind}"


def site_length(layer_info: dict, site: str) -> int:
    """Length of a statistics block / keep vector of one layer (a fingerprint entry) at ``site``."""
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; expected one of {SITES}")
    if site == "up" and layer_info.get("kind") != "gated":
        raise ValueError(f"site 'up' exists only on gated MLPs, this layer is {layer_info.get('kind')!r}")
    if site == "pre" and layer_info.get("kind") == "gate_up":
        raise ValueError("site 'pre' does not exist on an MLP whose gate and up come from one Linear ('gate_up')")
    return int(layer_info["hidden"] if site == "out" else layer_info["neurons"])


def check_fingerprint(expected: dict, found: dict, path=None) -> None:
    """Raise StatsFileError naming the first difference between two model fingerprints."""
    where = f"{path}: " if path else ""
    if expected == found:
        return
    if expected.get("model_type") != found.get("model_type"):
        raise StatsFileError(f"{where}made for model type {found.get('model_type')!r}, this model is {expected.get('model_type')!r}")
    el, fl = expected.get("layers", {}), found.get("layers", {})
    missing = sorted(set(el) - set(fl))
    extra = sorted(set(fl) - set(el))
    if missing or extra:
        raise StatsFileError(f"{where}made for another model: layers missing {missing[:3]}, unknown {extra[:3]}")
    for name in el:
        if el[name] != fl[name]:
            raise StatsFileError(f"{where}layer {name!r} differs: file has {fl[name]}, model has {el[name]}")
    raise StatsFileError(f"{where}model fingerprint differs")


def _describe(x) -> str:
    if not isinstance(x, torch.Tensor):
        return type(x).__name__
    return f"{x.dtype} {tuple(x.shape)} on {x.device}"


def check_backend_args(pre, up, act, keep, gid, num_groups, hidden_acc, pre_acc, up_acc) -> None:
    """The preconditions of the ``act_stats`` backend contract (docs/OPS.md), checked in O(1).

    ``pre`` (T, N) float32/bfloat16/float16, ``up`` None or the same shape/dtype/device; the rest as in
    ``check_launch_args``.
    """
    if not isinstance(pre, torch.Tensor) or pre.dim() != 2 or pre.dtype not in FLOAT_DTYPES:
        raise TypeError(f"pre must be a 2-D float32/bfloat16/float16 tensor, got {_describe(pre)}")
    if up is not None and (not isinstance(up, torch.Tensor) or up.shape != pre.shape or up.dtype != pre.dtype
                           or up.device != pre.device):
        raise ValueError(f"up must match pre ({_describe(pre)}), got {_describe(up)}")
    check_launch_args(*pre.shape, pre.device, act, keep, gid, num_groups, hidden_acc, pre_acc, up_acc, up is not None)


def check_launch_args(t, n, device, act, keep, gid, num_groups, hidden_acc, pre_acc, up_acc, has_up) -> None:
    """Preconditions shared by every compiled launch over T tokens x N neurons on ``device``: ``act`` a known
    activation, ``keep`` None or a bool (N,) tensor, ``gid`` None or an int32 (T,) tensor, accumulators None or
    contiguous float64 (NUM_FIELDS, num_groups, N), all on ``device``; ``up_acc`` only with an up projection.
    Group id *values* are the backend's business: the C++ kernel range-checks them before writing, the Triton
    kernels ignore ids outside [0, G).
    """
    if act not in ACT_CODES:
        raise ValueError(f"unknown activation {act!r}; supported: {', '.join(ACT_CODES)}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    if keep is not None and (not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.shape != (n,)
                             or keep.device != device):
        raise ValueError(f"keep must be a bool tensor of shape ({n},) on {device}, got {_describe(keep)}")
    if gid is not None and (not isinstance(gid, torch.Tensor) or gid.dtype != torch.int32 or gid.shape != (t,)
                            or gid.device != device):
        raise ValueError(f"group ids must be an int32 tensor of shape ({t},) on {device}, got {_describe(gid)}")
    for acc, name in ((hidden_acc, "stats (hidden_acc)"), (pre_acc, "pre_stats (pre_acc)"), (up_acc, "up_stats (up_acc)")):
        if acc is None:
            continue
        if not isinstance(acc, torch.Tensor) or acc.dtype != torch.float64 or acc.device != device:
            raise TypeError(f"{name} must be a float64 tensor on {device} (the activations' device), got "
                            f"{_describe(acc)}")
        if acc.shape != (NUM_FIELDS, num_groups, n) or not acc.is_contiguous():
            raise ValueError(f"{name} must be contiguous with shape {(NUM_FIELDS, num_groups, n)}, got "
                             f"{tuple(acc.shape)} strides {acc.stride()}")
    if up_acc is not None and not has_up:
        raise ValueError("up_acc given for a plain MLP (no up projection)")


def check_linear(weight, bias, name: str, n: int, d: int, x) -> None:
    """``weight`` (n, d) and ``bias`` None or (n,), both of x's dtype and device (an nn.Linear's parameters)."""
    if not isinstance(weight, torch.Tensor) or weight.shape != (n, d) or weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"{name} weight must be ({n}, {d}) {x.dtype} on {x.device}, got {_describe(weight)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (n,) or bias.dtype != x.dtype
                             or bias.device != x.device):
        raise ValueError(f"{name} bias must be ({n},) {x.dtype} on {x.device}, got {_describe(bias)}")


def linear_then_act_stats(act_stats_fn, x, w_gate, b_gate, w_up, b_up, act, keep, gid, num_groups, tau, hidden_acc,
                          pre_acc, up_acc):
    """The ``gated_linear_act_stats`` backend contract run unfused: the gate/up projections through F.linear (in
    x.dtype, as the HF module computes them), then the backend's ``act_stats`` implementation ``act_stats_fn``."""
    linear = torch.nn.functional.linear  # (``F`` here is the fields' index)
    return act_stats_fn(linear(x, w_gate, b_gate), linear(x, w_up, b_up), act, keep, gid, num_groups, tau,
                        hidden_acc, pre_acc, up_acc, True)
