"""The two ops, their float64 references, the one validation and the one dispatch point (docs/OPS.md).

``act_stats`` computes the MLP intermediate ``h = act(pre) * up`` (gated) or ``h = act(pre)`` (plain), zeroes
pruned neurons and merges per-group statistics of ``h`` (and, on request, of ``pre``/``up``) into float64
accumulators. ``gated_linear_act_stats`` is the front half of a gated MLP with the same epilogue: it starts
from the MLP input ``x`` and the gate/up weights, so a backend may fuse the two projections with it.

Backends (``get_backend(name, op)``), one implementation of each op per backend:

- ``reference``: PyTorch, float64 for the activation and the statistics: the oracle and the fallback
  (``manu_fast.backends.reference``);
- ``cpp``: the C++ CPU kernel (``csrc/``, ``manu_fast.backends.cpp``);
- ``triton``: the Triton GPU kernels (``kernels/``, installed as ``manu_fast.kernels``).

Backend contracts (docs/OPS.md has the full text):

- ``act_stats``: ``fn(pre, up, act, keep, gid, num_groups, tau, hidden_acc, pre_acc, up_acc, write_out) -> h | None``
  with ``pre``/``up`` (T, N) of one float dtype (any strides), ``keep`` a bool (N,) tensor or None, ``gid`` an
  int32 (T,) tensor (-1 = ignore) or None (every token in group 0), accumulators float64
  (NUM_FIELDS, G, N) or None, merged in place. ``h`` is returned in ``pre.dtype``, contiguous, when
  ``write_out``.
- ``gated_linear_act_stats``: ``fn(x, w_gate, b_gate, w_up, b_up, act, keep, gid, num_groups, tau, hidden_acc,
  pre_acc, up_acc) -> h`` with ``x`` (T, D), weights (N, D) in the nn.Linear layout, biases (N,) or None,
  ``pre_acc``/``up_acc`` the statistics of the gate/up projections.

Arguments reach a backend validated and normalised by the public functions below (once, here); backends
only assert their raw-memory preconditions (``manu_fast.backends.contract.check_backend_args``). Both ops are also
registered as torch.library custom ops (``torch.ops.manu_fast.act_stats`` / ``.gated_linear_act_stats``,
mutated accumulators declared, fake implementations) which the public functions call while torch.compile
traces; in eager mode they call the backend directly (the dispatcher costs ~65 us per call on CPU).
Autograd: the compiled backends write ``h`` through raw pointers, so when gradients are wanted the public
functions compute ``h`` with differentiable PyTorch and let the backend gather the statistics only.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch
import torch.nn.functional as F

from .activations import check_activation
from .backends.contract import FLOAT_DTYPES, check_launch_args, check_linear
from .backends.reference import act_stats_reference, gated_linear_act_stats_reference, hidden
from .install import cpp_fix, triton_fix
from .schema import DEFAULT_TAU

BACKENDS = ("reference", "cpp", "triton")
OPS = ("act_stats", "gated_linear_act_stats")
_warned = set()


# ---- dispatch ----

def get_backend(name: str, op: str = "act_stats"):
    """The implementation of ``op`` (one of OPS) in backend ``name`` (one of BACKENDS)."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; choose one of {OPS}")
    if name == "reference":
        return act_stats_reference if op == "act_stats" else gated_linear_act_stats_reference
    if name == "cpp":
        from .backends import cpp  # raises ImportError with build instructions when the extension is missing
        return getattr(cpp, f"{op}_cpp")
    if name == "triton":
        from . import kernels
        return getattr(kernels, f"{op}_triton")
    raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")


@functools.cache
def _importable(name: str) -> bool:
    try:
        get_backend(name)
        return True
    except ImportError:
        return False


def cpp_available() -> bool:
    """Whether the C++ extension imports (cached: the dispatch asks on every MLP call)."""
    return _importable("cpp")


def triton_available() -> bool:
    return _importable("triton")


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=4)


def fallback_announced() -> None:
    """The caller has told the user which backend runs (manu-fast's start line): no fallback warning later."""
    _warned.update(("cpp", "triton"))


def pick_backend(device: torch.device) -> str:
    """The dispatch rule: MANU_FAST_BACKEND if set, else Triton on CUDA, C++ on CPU, reference otherwise."""
    forced = os.environ.get("MANU_FAST_BACKEND")
    if forced:
        return forced
    if device.type == "cuda":
        if triton_available():
            return "triton"
        _warn_once("triton", f"manu_fast: Triton kernels unavailable, using the slow PyTorch reference; {triton_fix()}")
    if device.type == "cpu":
        if cpp_available():
            return "cpp"
        _warn_once("cpp", f"manu_fast: C++ extension manu_fast._C not built, using the slow PyTorch reference; {cpp_fix()}")
    return "reference"


BACKEND_TEXT = {"cpp": "C++ kernel (manu_fast._C)", "triton": "Triton kernels", "reference": "PyTorch reference (slow)"}


def describe_backend(device: torch.device) -> str:
    """One line: what ``pick_backend`` runs on ``device`` and, when a compiled backend is missing, how to get it."""
    forced = os.environ.get("MANU_FAST_BACKEND")
    if forced:
        return f"{BACKEND_TEXT.get(forced, forced)} (forced by MANU_FAST_BACKEND={forced})"
    if device.type == "cpu":
        return BACKEND_TEXT["cpp"] if cpp_available() else \
            f"{BACKEND_TEXT['reference']}: manu_fast._C is not built; {cpp_fix()}"
    if device.type == "cuda":
        if triton_available():
            interp = " in the CPU interpreter (TRITON_INTERPRET=1)" if os.environ.get("TRITON_INTERPRET") == "1" else ""
            return BACKEND_TEXT["triton"] + interp
        return f"{BACKEND_TEXT['reference']}: the Triton kernels are unavailable; {triton_fix()}"
    return f"{BACKEND_TEXT['reference']} (no compiled backend for {device.type})"


# ---- the custom ops (what torch.compile / torch.export see) ----
# Arguments follow the backend contracts, plus the backend's name (chosen by ``pick_backend``). A custom op
# cannot return None: without ``write_out`` act_stats returns an empty (0,) tensor.

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


@torch.library.custom_op(
    "manu_fast::gated_linear_act_stats", mutates_args=("hidden_acc", "pre_acc", "up_acc"),
    schema="(Tensor x, Tensor w_gate, Tensor? b_gate, Tensor w_up, Tensor? b_up, str act, Tensor? keep, Tensor? gid, "
           "int num_groups, float tau, Tensor(a!)? hidden_acc, Tensor(b!)? pre_acc, Tensor(c!)? up_acc, "
           "str backend) -> Tensor")
def gated_linear_act_stats_op(x, w_gate, b_gate, w_up, b_up, act, keep, gid, num_groups, tau, hidden_acc, pre_acc,
                              up_acc, backend):
    return get_backend(backend, "gated_linear_act_stats")(x, w_gate, b_gate, w_up, b_up, act, keep, gid, num_groups,
                                                          tau, hidden_acc, pre_acc, up_acc)


@gated_linear_act_stats_op.register_fake
def _gated_fake(x, w_gate, b_gate, w_up, b_up, act, keep, gid, num_groups, tau, hidden_acc, pre_acc, up_acc, backend):
    return x.new_empty((x.shape[0], w_gate.shape[0]))


# ---- validation (once, here) ----

def _prepare(n, t, device, keep, group_ids, stats, pre_stats, up_stats):
    """Validate the arguments both ops share; returns (keep, gid, num_groups) in the backend contract's form."""
    if keep is not None:
        if keep.shape != (n,):
            raise ValueError(f"keep mask has shape {tuple(keep.shape)}, expected ({n},) for this layer")
        keep = keep.to(device=device, dtype=torch.bool)
    accs = [a for a in (stats, pre_stats, up_stats) if a is not None]
    num_groups = accs[0].shape[1] if accs and accs[0].dim() == 3 else 1
    check_launch_args(t, n, device, "identity", None, None, num_groups, stats, pre_stats, up_stats, True)
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


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ---- the public ops ----

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
        backend: one of BACKENDS; default ``pick_backend(pre.device)``.
    Returns:
        ``h`` with shape and dtype of ``pre`` (None when ``write_out`` is False). When ``pre``/``up`` require
        gradients, ``h`` is differentiable (computed by PyTorch; the backend gathers the statistics).
    """
    check_activation(act)
    if not isinstance(pre, torch.Tensor) or not pre.is_floating_point() or pre.dim() < 1:
        raise TypeError("pre must be a floating-point tensor of shape (..., N)")
    if pre.dtype not in FLOAT_DTYPES:
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
    keep, gid, num_groups = _prepare(n, pre2.shape[0], pre.device, keep, group_ids, stats, pre_stats, up_stats)
    name = backend or pick_backend(pre.device)
    grad_h = None
    if write_out and _needs_grad(pre, up):
        # fp32 arithmetic, one rounding to pre.dtype, like the kernels
        grad_h = hidden(pre2.float(), None if up2 is None else up2.float(), act, keep).to(pre.dtype)
        pre2, up2, write_out = pre2.detach(), None if up2 is None else up2.detach(), False
        if stats is None and pre_stats is None and up_stats is None:
            return grad_h.reshape(shape)
    args = (pre2, up2, act, keep, gid, num_groups, float(tau), stats, pre_stats, up_stats, write_out)
    if torch.compiler.is_compiling():
        h = act_stats_op(*args, name)
    else:
        h = get_backend(name)(*args)
    if grad_h is not None:
        return grad_h.reshape(shape)
    return h.reshape(shape) if write_out else None


def gated_linear_act_stats(x: torch.Tensor, w_gate: torch.Tensor, b_gate: torch.Tensor | None, w_up: torch.Tensor,
                           b_up: torch.Tensor | None, *, act: str, keep: torch.Tensor | None = None,
                           group_ids: torch.Tensor | None = None, stats: torch.Tensor | None = None,
                           pre_stats: torch.Tensor | None = None, up_stats: torch.Tensor | None = None,
                           tau: float = DEFAULT_TAU, backend: str | None = None) -> torch.Tensor:
    """Front half of a gated MLP with statistics: ``h = act(F.linear(x, w_gate, b_gate)) * F.linear(x, w_up, b_up)``.

    Arguments as in ``act_stats``; weights are (N, D) (nn.Linear layout), ``pre_stats``/``up_stats`` gather the
    statistics of the gate/up projections. Returns ``h`` of shape (..., N) in ``x.dtype``. How the
    projections run is the backend's choice: the reference and C++ backends call F.linear; the Triton backend
    may fuse them with the epilogue in one GEMM kernel (``manu_fast.kernels.prefer_fused_gemm``), whose g and u
    stay in fp32, so its statistics are slightly more accurate than those of g, u rounded to ``x.dtype``.
    """
    check_activation(act)
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.dtype not in FLOAT_DTYPES:
        raise TypeError("x must be a float32/float16/bfloat16 tensor of shape (..., D)")
    if not isinstance(w_gate, torch.Tensor) or w_gate.dim() != 2:
        raise TypeError("w_gate must be a (N, D) weight")
    n, d = w_gate.shape[0], x.shape[-1]
    check_linear(w_gate, b_gate, "gate", n, d, x)
    check_linear(w_up, b_up, "up", n, d, x)
    if _needs_grad(x, w_gate, b_gate, w_up, b_up):
        return act_stats(F.linear(x, w_gate, b_gate), F.linear(x, w_up, b_up), act=act, keep=keep,
                         group_ids=group_ids, stats=stats, pre_stats=pre_stats, up_stats=up_stats, tau=tau,
                         backend=backend)
    x2 = x.reshape(x.shape[:-1].numel(), d)
    keep, gid, num_groups = _prepare(n, x2.shape[0], x.device, keep, group_ids, stats, pre_stats, up_stats)
    name = backend or pick_backend(x.device)
    args = (x2, w_gate, b_gate, w_up, b_up, act, keep, gid, num_groups, float(tau), stats, pre_stats, up_stats)
    if torch.compiler.is_compiling():
        h = gated_linear_act_stats_op(*args, name)
    else:
        h = get_backend(name, "gated_linear_act_stats")(*args)
    return h.reshape(*x.shape[:-1], n)
