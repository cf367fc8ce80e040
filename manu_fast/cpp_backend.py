"""The C++ CPU backend of ``act_stats`` (``csrc/``, built into ``manu_fast._C``).

The extension works on raw buffers (data pointers, sizes, row strides) so that it does not depend on the
torch version; everything it trusts is checked here first, and a bad argument raises a Python exception.
Importing this module raises ImportError (with the build command) when the extension is not built;
``manu_fast.ops`` catches that and falls back to the PyTorch reference.
"""
from __future__ import annotations

import torch

from .activations import ACT_CODES
from .stats import NUM_FIELDS

try:
    from . import _C
except ImportError as e:  # pragma: no cover - depends on the build
    raise ImportError("manu_fast._C (the C++ CPU kernel) is not built; build it with `pip install -e .` in the "
                      "manu_fast repository (needs a C++17 compiler and pybind11)") from e

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _rows(x: torch.Tensor) -> torch.Tensor:
    """The C++ kernel reads rows with any stride but needs unit stride along neurons."""
    return x if x.shape[1] <= 1 or x.stride(1) == 1 else x.contiguous()


def _check_acc(acc, name, num_groups, n):
    if acc is None:
        return
    if not isinstance(acc, torch.Tensor) or acc.dtype != torch.float64 or acc.device.type != "cpu":
        raise TypeError(f"{name} must be a float64 CPU tensor, got {getattr(acc, 'dtype', type(acc))} "
                        f"on {getattr(acc, 'device', '?')}")
    if tuple(acc.shape) != (NUM_FIELDS, num_groups, n) or not acc.is_contiguous():
        raise ValueError(f"{name} must be contiguous with shape {(NUM_FIELDS, num_groups, n)}, got {tuple(acc.shape)}")


def act_stats_cpp(pre, up, act, keep, gid, num_groups, tau, hidden_acc, pre_acc, up_acc, write_out,
                  num_threads: int | None = None, allow_avx2: bool = True):
    """The ``act_stats`` backend contract (see ``manu_fast.ops``) on CPU tensors, in one pass over memory.

    Extra (keyword) arguments: ``num_threads`` (default ``torch.get_num_threads()``; results are
    bit-identical for any value), ``allow_avx2=False`` forces the baseline-ISA code path (same bits).
    """
    if not isinstance(pre, torch.Tensor) or pre.dim() != 2 or pre.dtype not in _DTYPE_CODES:
        raise TypeError(f"pre must be a 2-D float32/bfloat16/float16 tensor, got "
                        f"{getattr(pre, 'dtype', type(pre))} with shape {tuple(getattr(pre, 'shape', ()))}")
    if pre.device.type != "cpu":
        raise ValueError(f"the C++ backend runs on CPU tensors; pre is on {pre.device}")
    t, n = pre.shape
    if up is not None:
        if not isinstance(up, torch.Tensor) or up.shape != pre.shape or up.dtype != pre.dtype or up.device != pre.device:
            raise ValueError(f"up must match pre {tuple(pre.shape)} {pre.dtype} cpu, got "
                             f"{tuple(getattr(up, 'shape', ()))} {getattr(up, 'dtype', type(up))} {getattr(up, 'device', '')}")
        up = _rows(up)
    pre = _rows(pre)
    if act not in ACT_CODES:
        raise ValueError(f"unknown activation {act!r}; supported: {', '.join(ACT_CODES)}")
    if not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    if keep is not None:
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or tuple(keep.shape) != (n,):
            raise ValueError(f"keep must be a bool tensor of shape ({n},), got "
                             f"{getattr(keep, 'dtype', type(keep))} {tuple(getattr(keep, 'shape', ()))}")
        keep = keep.to("cpu").contiguous()
    if gid is not None:
        if not isinstance(gid, torch.Tensor) or gid.dtype != torch.int32 or tuple(gid.shape) != (t,):
            raise ValueError(f"group ids must be an int32 tensor of shape ({t},), got "
                             f"{getattr(gid, 'dtype', type(gid))} {tuple(getattr(gid, 'shape', ()))}")
        gid = gid.to("cpu").contiguous()  # range [-1, num_groups) is checked in C++ before anything is written
    for acc, name in ((hidden_acc, "hidden_acc"), (pre_acc, "pre_acc"), (up_acc, "up_acc")):
        _check_acc(acc, name, num_groups, n)
    if up_acc is not None and up is None:
        raise ValueError("up_acc given for a plain MLP (no up projection)")
    tau = float(tau)
    if num_threads is None:
        num_threads = torch.get_num_threads()
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    out = torch.empty((t, n), dtype=pre.dtype) if write_out else None

    def ptr(x):
        return 0 if x is None else x.data_ptr()

    _C.act_stats(ptr(pre), pre.stride(0), ptr(up), 0 if up is None else up.stride(0), t, n, _DTYPE_CODES[pre.dtype],
                 ACT_CODES[act], ptr(keep), ptr(gid), num_groups, tau, ptr(hidden_acc), ptr(pre_acc), ptr(up_acc),
                 ptr(out), int(num_threads), bool(allow_avx2))
    return out
