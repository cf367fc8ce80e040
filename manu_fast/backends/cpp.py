"""The C++ CPU backend of both ops (``csrc/``, built into ``manu_fast._C``).

The extension works on raw buffers (data pointers, sizes, row strides) so that it does not depend on the
torch version; the preconditions it trusts are asserted here first (``manu_fast.backends.contract.check_backend_args``),
so a bad argument raises a Python exception instead of touching memory out of bounds.
Importing this module raises ImportError (with the build command) when the extension is not built;
``manu_fast.ops`` catches that and falls back to the PyTorch reference.
"""
from __future__ import annotations

import torch

from ..activations import ACT_CODES
from .contract import check_backend_args, linear_then_act_stats

try:
    from .. import _C
except ImportError as e:  # pragma: no cover - depends on the build
    from ..install import cpp_fix
    raise ImportError(f"manu_fast._C (the C++ CPU kernel) is not built; {cpp_fix()}") from e

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _rows(x: torch.Tensor) -> torch.Tensor:
    """The C++ kernel reads rows with any stride but needs unit stride along neurons."""
    return x if x.shape[1] <= 1 or x.stride(1) == 1 else x.contiguous()


def act_stats_cpp(pre, up, act, keep, gid, num_groups, tau, hidden_acc, pre_acc, up_acc, write_out,
                  num_threads: int | None = None, allow_avx2: bool = True):
    """The ``act_stats`` backend contract (docs/OPS.md) on CPU tensors, in one pass over memory.

    Extra (keyword) arguments: ``num_threads`` (default ``torch.get_num_threads()``; results are
    bit-identical for any value), ``allow_avx2=False`` forces the baseline-ISA code path (same bits).
    Arguments are validated by ``manu_fast.ops``; here only the raw-pointer preconditions are asserted
    (``check_backend_args``), and the kernel range-checks group ids before it writes anything.
    """
    check_backend_args(pre, up, act, keep, gid, num_groups, hidden_acc, pre_acc, up_acc)
    if pre.device.type != "cpu":
        raise ValueError(f"the C++ backend runs on CPU tensors; pre is on {pre.device}")
    t, n = pre.shape
    pre, up = _rows(pre), None if up is None else _rows(up)
    keep = None if keep is None else keep.contiguous()
    gid = None if gid is None else gid.contiguous()
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


def gated_linear_act_stats_cpp(*args):
    """The ``gated_linear_act_stats`` backend contract on CPU: the projections through F.linear (oneDNN/BLAS),
    then ``act_stats_cpp`` in one pass."""
    return linear_then_act_stats(act_stats_cpp, *args)
