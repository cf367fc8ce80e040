"""``manu_fast::act_stats`` and ``manu_fast::gated_linear_act_stats`` as torch.library custom ops: schema, fake
implementation and declared mutations checked by torch.library.opcheck on every backend (Triton through its
interpreter on CPU tensors), and the ops under torch.compile giving eager's results."""
import os
import shutil

import pytest
import torch

from manu_fast import ops
from manu_fast.stats import empty_stats

CPU = torch.device("cpu")
BACKENDS = ["reference",
            pytest.param("cpp", marks=pytest.mark.skipif(not ops.cpp_available(), reason="manu_fast._C not built")),
            # CPU tensors: only Triton's interpreter takes them (compiled Triton is opchecked on CUDA by gpu_check.sh)
            pytest.param("triton", marks=pytest.mark.skipif(
                not ops.triton_available() or os.environ.get("TRITON_INTERPRET") != "1",
                reason="needs triton and TRITON_INTERPRET=1"))]


def _inputs(T=9, N=12, G=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    pre = (torch.randn(T, N, generator=g) * 2).to(dtype)
    up = torch.randn(T, N, generator=g).to(dtype)
    gid = torch.randint(-1, G, (T,), generator=g, dtype=torch.int32)
    keep = torch.rand(N, generator=g) > 0.25
    return pre, up, gid, keep


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_gated_all_sites(backend):
    pre, up, gid, keep = _inputs()
    pre = pre.t().contiguous().t()  # column-major: the output must still be contiguous, as the fake promises
    accs = [empty_stats(3, 12, CPU) for _ in range(3)]
    torch.library.opcheck(ops.act_stats_op, (pre, up, "silu", keep, gid, 3, 0.1, *accs, True, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_plain_pre_site_without_output(backend):
    pre, _, _, _ = _inputs(dtype=torch.bfloat16)
    acc = empty_stats(1, 12, CPU)
    torch.library.opcheck(ops.act_stats_op, (pre, None, "gelu", None, None, 1, 0.1, None, acc, None, False, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_updates_accumulators_like_the_backend(backend):
    """The op is the backend plus the schema: same output, same accumulator bits."""
    pre, up, gid, keep = _inputs(seed=1)
    accs_op = [empty_stats(3, 12, CPU) for _ in range(3)]
    accs_fn = [a.clone() for a in accs_op]
    h_op = torch.ops.manu_fast.act_stats(pre, up, "silu", keep, gid, 3, 0.1, *accs_op, True, backend)
    h_fn = ops.get_backend(backend)(pre, up, "silu", keep, gid, 3, 0.1, *accs_fn, True)
    assert torch.equal(h_op, h_fn)
    assert accs_op[0][0].sum() == (gid >= 0).sum() * 12  # the counts really were merged
    for a, b in zip(accs_op, accs_fn):
        assert torch.equal(a, b)
    empty = torch.ops.manu_fast.act_stats(pre, up, "silu", keep, gid, 3, 0.1, *accs_op, False, backend)
    assert empty.shape == (0,) and empty.dtype == pre.dtype


def _gated_inputs(T=10, D=8, N=12, G=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    w_gate, w_up = (torch.randn(N, D, generator=g) / D ** 0.5 for _ in range(2))
    b_gate = torch.randn(N, generator=g)
    gid = torch.randint(-1, G, (T,), generator=g, dtype=torch.int32)
    keep = torch.rand(N, generator=g) > 0.25
    return x, w_gate, b_gate, w_up, gid, keep


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_gated_linear(backend):
    x, w_gate, b_gate, w_up, gid, keep = _gated_inputs()
    accs = [empty_stats(3, 12, CPU) for _ in range(3)]
    torch.library.opcheck(ops.gated_linear_act_stats_op,
                          (x, w_gate, b_gate, w_up, None, "silu", keep, gid, 3, 0.1, *accs, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gated_op_is_linear_then_act_stats(backend):
    """gated_linear_act_stats == act_stats(F.linear, F.linear) on every backend (same statistics up to rounding)."""
    x, w_gate, b_gate, w_up, gid, keep = _gated_inputs(seed=4)
    accs = [empty_stats(3, 12, CPU) for _ in range(3)]
    ref = [a.clone() for a in accs]
    h = ops.gated_linear_act_stats(x.view(2, 5, 8), w_gate, b_gate, w_up, None, act="silu", keep=keep,
                                   group_ids=gid.view(2, 5), stats=accs[0], pre_stats=accs[1], up_stats=accs[2],
                                   backend=backend)
    g, u = torch.nn.functional.linear(x, w_gate, b_gate), torch.nn.functional.linear(x, w_up)
    h_ref = ops.act_stats(g, u, act="silu", keep=keep, group_ids=gid, stats=ref[0], pre_stats=ref[1],
                          up_stats=ref[2], backend="reference")
    assert h.shape == (2, 5, 12)
    torch.testing.assert_close(h.reshape(10, 12), h_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(accs, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _step(pre, up, gid, keep, stats, up_stats, backend):
    h = ops.act_stats(pre, up, act="silu", keep=keep, group_ids=gid, stats=stats, up_stats=up_stats, backend=backend)
    return h * 2.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_matches_eager_and_keeps_the_op_in_the_graph(backend):
    pre, up, gid, keep = _inputs(T=2 * 9, seed=2)
    pre, up = pre.view(2, 9, 12), up.view(2, 9, 12)  # (batch, tokens, N) like an MLP input
    gid = gid.view(2, 9)
    eager_accs = [empty_stats(3, 12, CPU) for _ in range(2)]
    compiled_accs = [a.clone() for a in eager_accs]
    graph_ops = []

    def recording_backend(gm, example_inputs):
        graph_ops.extend(node.target for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(_step, backend=recording_backend, fullgraph=False)
    for _ in range(2):  # twice: accumulators must be updated in place on every call, not only while tracing
        want = _step(pre, up, gid, keep, *eager_accs, backend)
        got = compiled(pre, up, gid, keep, *compiled_accs, backend)
        assert torch.equal(got, want)
        for a, b in zip(compiled_accs, eager_accs):
            assert torch.equal(a, b)
    assert torch.ops.manu_fast.act_stats.default in graph_ops


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile's inductor backend needs a C++ compiler on CPU")
def test_torch_compile_inductor_matches_eager():
    """Inductor functionalizes the in-place accumulator updates; results must still be eager's bits."""
    backend = "cpp" if ops.cpp_available() else "reference"
    pre, up, gid, keep = _inputs(seed=3)
    eager_accs = [empty_stats(3, 12, CPU) for _ in range(2)]
    compiled_accs = [a.clone() for a in eager_accs]
    torch._dynamo.reset()
    compiled = torch.compile(_step, fullgraph=False)
    want = _step(pre, up, gid, keep, *eager_accs, backend)
    got = compiled(pre, up, gid, keep, *compiled_accs, backend)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for a, b in zip(compiled_accs, eager_accs):
        assert torch.equal(a, b)
