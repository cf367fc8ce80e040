"""The core op, its pure-PyTorch reference, and the single dispatch point.

``act_stats`` computes the MLP intermediate ``h = act(pre) * up`` (gated) or ``h = act(pre)`` (plain),
zeroes pruned neurons, and merges per-group statistics of ``h`` (and, on request, of ``pre``/``up``)
into float64 accumulators. Backends:

- ``reference``: float64 PyTorch, the oracle and the fallback (this file);
- ``cpp``: the C++ CPU kernel (``csrc/``, built into ``manu_fast._C``);
- ``triton``: the Triton GPU kernel (``kernels/``, installed as ``manu_fast.kernels``).

Backend contract (every implementation): ``fn(pre, up, act, keep, gid, num_groups, tau, hidden_acc,
pre_acc, up_acc, write_out) -> h | None`` with ``pre``/``up`` 2-D (T, N) of one float dtype (any strides),
``keep`` a (N,) bool tensor or None, ``gid`` a (T,) int32 tensor (-1 = ignore) or None (all tokens in
group 0), accumulators float64 (NUM_FIELDS, G, N) or None, updated in place by an exact merge. ``h`` is
returned in ``pre.dtype``, contiguous, when ``write_out``.

The same contract is registered as the torch.library custom op ``manu_fast::act_stats`` (``act_stats_op``),
which ``act_stats`` calls while torch.compile traces it.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch

from .activations import ACTIVATIONS, check_activation
from .stats import DEFAULT_TAU, NUM_FIELDS, merge_into, segment_stats_reference

BACKENDS = ("reference", "cpp", "triton")
_warned = set()


def reference_backend(pre, up, act, keep, gid, num_groups, tau, hidden_acc, pre_acc, up_acc, write_out):
    p64 = pre.to(torch.float64)
    h = ACTIVATIONS[act](p64)
    u64 = None
    if up is not None:
        u64 = up.to(torch.float64)
        h = h * u64
    if keep is not None:
        h = torch.where(keep.to(h.device), h, 0.0)
    if gid is None:
        gid = torch.zeros(pre.shape[0], dtype=torch.int32, device=pre.device)
    for acc, a in ((hidden_acc, h), (pre_acc, p64), (up_acc, u64)):
        if acc is not None:
            merge_into(acc, segment_stats_reference(a, gid, num_groups, tau))
    return h.to(pre.dtype, memory_format=torch.contiguous_format) if write_out else None  # contiguous, as promised


def _cpp_backend():
    from . import cpp_backend  # raises ImportError with build instructions when the extension is missing
    return cpp_backend.act_stats_cpp


def _triton_backend():
    from .kernels import act_stats_triton
    return act_stats_triton


@functools.cache
def cpp_available() -> bool:
    """Whether the C++ extension imports (cached: the dispatch asks on every MLP call)."""
    try:
        _cpp_backend()
        return True
    except ImportError:
        return False


@functools.cache
def triton_available() -> bool:
    try:
        _triton_backend()
        return True
    except ImportError:
        return False


def get_backend(name: str):
    if name == "reference":
        return reference_backend
    if name == "cpp":
        return _cpp_backend()
    if name == "triton":
        return _triton_backend()
    raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=4)


def pick_backend(device: torch.device) -> str:
    """The dispatch rule: MANU_FAST_BACKEND if set, else Triton on CUDA, C++ on CPU, reference otherwise."""
    forced = os.environ.get("MANU_FAST_BACKEND")
    if forced:
        return forced
    if device.type == "cuda":
        if triton_available():
            return "triton"
        _warn_once("triton", "manu_fast: Triton kernels unavailable (is triton installed, and manu_fast installed with "
                             "`pip install -e .` so that manu_fast.kernels exists?); using the slow PyTorch reference")
    if device.type == "cpu":
        if cpp_available():
            return "cpp"
        _warn_once("cpp", "manu_fast: C++ extension manu_fast._C not built; using the slow PyTorch reference. "
                          "Build it with `pip install -e .` (needs a C++ compiler and pybind11).")
    return "reference"


# The op as a torch.library custom op (``torch.ops.manu_fast.act_stats``), so that torch.compile / torch.export
# see one opaque node, with its in-place updates of the accumulators declared, instead of breaking the graph
# at the backend's raw pointers. Arguments follow the backend contract, plus the backend's name (chosen by
# ``pick_backend``). A custom op cannot return None: without ``write_out`` it returns an empty (0,) tensor.
# ``act_stats`` goes through it only while torch.compile traces: in eager mode the dispatcher's Python
# layers cost ~65 us per call (torch 2.13, 2-core CPU), more than the C++ kernel itself on a small batch.
@torch.library.custom_op(
    "manu_fast::act_stats", mutates_args=("hidden_acc", "pre_acc", "up_acc"),
    schema="(Tensor pre, Tensor? up, str act, Tensor? keep, Tensor? gid, int num_groups, float tau, "
           "Tensor(a!)? hidden_acc, Tensor(b!)? pre_acc, Tensor(c!)? up_acc, bool write_out, str backend) -> Tensor")
def act_stats_op(pre, up, act, keep, gid, num_groups, tau, hidden_acc, pre_acc, up_acc, write_out, backend):
    h = get_backend(backend)(pre, up, act, keep, gid, num_groups, tau, hidden_acc, pre_acc, up_acc, write_out)
    return h if write_out else pre.new_empty(0)


@act_stats_op.register_fake
def _act_stats_fake(pre, up, act, keep, gid, num_groups, tau, hidden_acc, pre_acc, up_acc, write_out, backend):
    return pre.new_empty(pre.shape if write_out else (0,))


def _check_acc(acc, name, num_groups, n, device):
    if acc is None:
        return
    if acc.dtype != torch.float64 or acc.shape != (NUM_FIELDS, num_groups, n) or not acc.is_contiguous():
        raise ValueError(f"{name} must be a contiguous float64 tensor of shape {(NUM_FIELDS, num_groups, n)}, "
                         f"got {tuple(acc.shape)} {acc.dtype}")
    if acc.device != device:
        raise ValueError(f"{name} is on {acc.device}, activations on {device}")


def _check_common(n, t, device, keep, group_ids, stats, pre_stats, up_stats):
    """Validate the arguments every entry point shares; returns (keep, gid, num_groups) ready for a backend."""
    if keep is not None:
        if keep.shape != (n,):
            raise ValueError(f"keep mask has shape {tuple(keep.shape)}, expected ({n},) for this layer")
        keep = keep.to(device=device, dtype=torch.bool)
    accs = [a for a in (stats, pre_stats, up_stats) if a is not None]
    num_groups = accs[0].shape[1] if accs else 1
    for acc, name in ((stats, "stats"), (pre_stats, "pre_stats"), (up_stats, "up_stats")):
        _check_acc(acc, name, num_groups, n, device)
    gid = None
    if group_ids is not None:
        if group_ids.numel() != t or group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
            raise ValueError(f"group_ids must be an integer tensor with {t} elements (one per token), "
                             f"got {tuple(group_ids.shape)} {group_ids.dtype}")
        gid = group_ids.reshape(-1).to(device=device, dtype=torch.int32)
        # Range-checked off CUDA only (a check there would cost a device sync per MLP call). On CUDA the Triton
        # kernel ignores ids outside [0, G) like -1; the profiler builds ids in range by construction.
        if accs and gid.device.type != "cuda" and t:
            lo, hi = int(gid.min()), int(gid.max())
            if lo < -1 or hi >= num_groups:
                raise ValueError(f"group ids must lie in [-1, {num_groups - 1}], found [{lo}, {hi}]")
    return keep, gid, num_groups


def act_stats(pre: torch.Tensor, up: torch.Tensor | None = None, *, act: str = "silu",
              keep: torch.Tensor | None = None, group_ids: torch.Tensor | None = None,
              stats: torch.Tensor | None = None, pre_stats: torch.Tensor | None = None,
              up_stats: torch.Tensor | None = None, tau: float = DEFAULT_TAU, write_out: bool = True,
              backend: str | None = None) -> torch.Tensor | None:
    """Fused MLP activation + neuron mask + segmented per-neuron statistics.

    Args:
        pre: (..., N) gate projection (gated MLP) or fc1 output (plain MLP), fp32/fp16/bf16.
        up: (..., N) up projection for a gated MLP, None for a plain one.
        act: one of ``manu_fast.activations.ACTIVATIONS``.
        keep: (N,) bool, False zeroes the neuron in the output (and in the statistics of ``h``).
        group_ids: (...,) integer group per token, -1 ignores the token; None puts every token in group 0.
            Ids outside [-1, G) raise off CUDA; on CUDA (no device sync per call) they are ignored like -1.
        stats / pre_stats / up_stats: float64 (NUM_FIELDS, G, N) accumulators for ``h``/``pre``/``up``,
            merged in place; None skips that site.
        tau: activity threshold for the ``active`` count (|a| > tau).
        write_out: return ``h`` (False only gathers statistics, e.g. on an MLP output).
    Returns:
        ``h`` with shape and dtype of ``pre`` (None when ``write_out`` is False).
    """
    check_activation(act)
    if not isinstance(pre, torch.Tensor) or not pre.is_floating_point() or pre.dim() < 1:
        raise TypeError("pre must be a floating-point tensor of shape (..., N)")
    if pre.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"pre has dtype {pre.dtype}; supported: float32, float16, bfloat16")
    shape = pre.shape
    n = shape[-1]
    pre2 = pre.reshape(shape[:-1].numel(), n)  # (not -1: N may be 0, e.g. a fully pruned compact layer)
    up2 = None
    if up is not None:
        if up.shape != shape or up.dtype != pre.dtype or up.device != pre.device:
            raise ValueError(f"up {tuple(up.shape)} {up.dtype} {up.device} must match pre {tuple(shape)} {pre.dtype} {pre.device}")
        up2 = up.reshape(pre2.shape)
    if up_stats is not None and up is None:
        raise ValueError("up_stats given for a plain MLP (no up projection)")
    keep, gid, num_groups = _check_common(n, pre2.shape[0], pre.device, keep, group_ids, stats, pre_stats, up_stats)
    name = backend or pick_backend(pre.device)
    if torch.compiler.is_compiling():
        h = act_stats_op(pre2, up2, act, keep, gid, num_groups, float(tau), stats, pre_stats, up_stats, write_out, name)
    else:
        h = get_backend(name)(pre2, up2, act, keep, gid, num_groups, float(tau), stats, pre_stats, up_stats, write_out)
    return h.reshape(shape) if write_out else None


def gated_linear_act_stats(x: torch.Tensor, w_gate: torch.Tensor, b_gate: torch.Tensor | None, w_up: torch.Tensor,
                           b_up: torch.Tensor | None, *, act: str, keep: torch.Tensor | None = None,
                           group_ids: torch.Tensor | None = None, stats: torch.Tensor | None = None,
                           pre_stats: torch.Tensor | None = None, up_stats: torch.Tensor | None = None,
                           tau: float = DEFAULT_TAU, backend: str | None = None) -> torch.Tensor:
    """Front half of a gated MLP with statistics: ``h = act(F.linear(x, w_gate, b_gate)) * F.linear(x, w_up, b_up)``.

    With the ``triton`` backend (the default on CUDA) the gate/up projections and ``act_stats`` run as one
    fused Triton GEMM when ``manu_fast.kernels.prefer_fused_gemm`` says so for the shape (env override
    ``MANU_FAST_GATED_PATH=fused|unfused``); otherwise, and on every other backend, the projections run
    through F.linear and ``act_stats`` does the rest. Arguments as in ``act_stats``; weights are (N, D)
    (nn.Linear layout). Returns ``h`` of shape (..., N) in ``x.dtype``. The fused path keeps g and u in fp32,
    so its statistics are slightly more accurate than the unfused path's (which sees g, u rounded to x.dtype).
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or w_gate.dim() != 2:
        raise TypeError("x must be a tensor of shape (..., D) and w_gate a (N, D) weight")
    name = backend or pick_backend(x.device)
    if name == "triton":
        from .kernels import gated_act_stats_triton, prefer_fused_gemm
        n = w_gate.shape[0]
        x2 = x.reshape(-1, x.shape[-1])
        if prefer_fused_gemm(x2.shape[0], x2.shape[1], n):
            check_activation(act)
            keep_n, gid, num_groups = _check_common(n, x2.shape[0], x.device, keep, group_ids, stats, pre_stats, up_stats)
            h = gated_act_stats_triton(x2, w_gate, b_gate, w_up, b_up, act, keep_n, gid, num_groups, float(tau),
                                       stats, pre_stats, up_stats)
            return h.reshape(*x.shape[:-1], n)
    gate = torch.nn.functional.linear(x, w_gate, b_gate)
    up = torch.nn.functional.linear(x, w_up, b_up)
    return act_stats(gate, up, act=act, keep=keep, group_ids=group_ids, stats=stats, pre_stats=pre_stats,
                     up_stats=up_stats, tau=tau, backend=name)
