"""The backend contract of both ops (docs/OPS.md): the raw-memory preconditions every backend asserts in O(1)
before touching memory, and the unfused ``gated_linear_act_stats`` (projections, then a backend's ``act_stats``)."""
from __future__ import annotations

import torch

from ..activations import ACT_CODES
from ..schema import NUM_FIELDS

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
    linear = torch.nn.functional.linear
    return act_stats_fn(linear(x, w_gate, b_gate), linear(x, w_up, b_up), act, keep, gid, num_groups, tau,
                        hidden_acc, pre_acc, up_acc, True)
