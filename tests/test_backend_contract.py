"""Every compiled backend called directly (past the op's validation) with arguments that break its raw-memory
preconditions raises a clear error and writes nothing: no read or write out of bounds, accumulators unchanged.

The preconditions are asserted once, in ``manu_fast.schema.check_backend_args`` / ``check_launch_args``; the
C++ kernel also range-checks group ids before it writes (the Triton kernels ignore ids outside [0, G))."""
import os

import pytest
import torch

from manu_fast import ops
from manu_fast.stats import empty_stats

BACKENDS = [
    pytest.param("cpp", marks=pytest.mark.skipif(not ops.cpp_available(), reason="manu_fast._C not built")),
    pytest.param("triton", marks=pytest.mark.skipif(
        not ops.triton_available() or (os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available()),
        reason="needs triton (interpreter or CUDA)")),
]


def _device(backend):
    return torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")


def _valid_args(device, **override):
    t, n, groups = 6, 10, 2
    args = dict(pre=torch.randn(t, n), up=torch.randn(t, n), act="silu", keep=None,
                gid=torch.zeros(t, dtype=torch.int32), num_groups=groups, tau=0.1, hidden_acc=empty_stats(groups, n),
                pre_acc=None, up_acc=None, write_out=True)
    args.update(override)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


BAD = [
    (dict(pre=torch.randn(6, 10, dtype=torch.float64)), TypeError, "float32/bfloat16/float16"),
    (dict(pre=torch.randn(60)), TypeError, "2-D"),
    (dict(up=torch.randn(6, 11)), ValueError, "up must match"),
    (dict(up=torch.randn(6, 10).bfloat16()), ValueError, "up must match"),
    (dict(act="swish"), ValueError, "unknown activation"),
    (dict(keep=torch.ones(9, dtype=torch.bool)), ValueError, "keep must be a bool tensor of shape"),
    (dict(keep=torch.ones(10)), ValueError, "keep must be a bool"),
    (dict(gid=torch.zeros(5, dtype=torch.int32)), ValueError, "group ids must be an int32 tensor of shape"),
    (dict(gid=torch.zeros(6, dtype=torch.int64)), ValueError, "int32"),
    (dict(hidden_acc=empty_stats(3, 10)), ValueError, "shape"),
    (dict(hidden_acc=empty_stats(2, 9)), ValueError, "shape"),
    (dict(hidden_acc=empty_stats(2, 10).float()), TypeError, "float64"),
    (dict(hidden_acc=empty_stats(2, 10).transpose(1, 2).contiguous().transpose(1, 2)), ValueError, "contiguous"),
    (dict(up=None, up_acc=empty_stats(2, 10)), ValueError, "plain MLP"),
    (dict(num_groups=0), ValueError, "num_groups"),
    (dict(num_groups=3), ValueError, "shape"),  # accumulators of 2 groups, kernel told 3: would write past them
]
CPP_ONLY = [  # the C++ kernel indexes accumulators by group id; Triton ignores ids outside [0, G) (tested there)
    (dict(gid=torch.tensor([0, 1, 2, 0, 0, 0], dtype=torch.int32)), ValueError, r"out of range \[-1, 1\]"),
    (dict(gid=torch.tensor([0, -2, 0, 0, 0, 0], dtype=torch.int32)), ValueError, "out of range"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("override, error, match, cpp_only", [(*c, False) for c in BAD] + [(*c, True) for c in CPP_ONLY])
def test_bad_inputs_raise_clear_errors_and_change_nothing(backend, override, error, match, cpp_only):
    if cpp_only and backend != "cpp":
        pytest.skip("C++ only")
    args = _valid_args(_device(backend), **override)
    before = args["hidden_acc"].clone()
    with pytest.raises(error, match=match):
        ops.get_backend(backend)(**args)
    assert torch.equal(args["hidden_acc"], before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gated_backend_refuses_mismatched_weights(backend):
    dev = _device(backend)
    x, acc = torch.randn(4, 3, device=dev), empty_stats(1, 5, dev)
    before = acc.clone()
    fn = ops.get_backend(backend, "gated_linear_act_stats")
    with pytest.raises((ValueError, RuntimeError), match="gate weight|shapes cannot be multiplied"):
        fn(x, torch.randn(5, 2, device=dev), None, torch.randn(5, 3, device=dev), None, "silu", None, None, 1, 0.1,
           acc, None, None)
    assert torch.equal(acc, before)
