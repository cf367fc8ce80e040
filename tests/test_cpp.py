"""The C++ CPU kernel (manu_fast._C via backends.cpp.act_stats_cpp) against the float64 reference.

Tolerances are derived, not guessed: for every output (h and each statistics field) the kernel's error
against float64 must be at most twice PyTorch's own error at the input precision (the same formulas run
in that dtype, the way an uninstrumented model computes h) plus a small atol. Counts must match exactly.
"""
import pytest
import torch

from manu_fast import act_stats
from manu_fast.activations import ACT_CODES, ACTIVATIONS
from manu_fast.backends.reference import act_stats_reference as reference_backend
from manu_fast.ops import pick_backend
from manu_fast.stats import FIELD_INDEX, empty_stats, merge_into, metrics, segment_stats_reference

try:
    from manu_fast.backends.cpp import act_stats_cpp
except ImportError as e:  # CI builds the extension, so there these tests run
    pytest.skip(f"C++ extension not built ({e})", allow_module_level=True)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
COUNT_FIELDS = ("count", "nonfinite")
FLOAT_FIELDS = ("mean", "m2", "sum_abs", "sum_sq")


def _inputs(t, n, dtype, gated, seed, mean=0.0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    pre = (torch.randn(t, n, generator=g, dtype=torch.float64) * scale + mean).to(dtype)
    up = torch.randn(t, n, generator=g, dtype=torch.float64).to(dtype) if gated else None
    return pre, up, g


def _start_acc(num_groups, n, seed):
    """A realistic non-empty accumulator (statistics of earlier batches), so merges are exercised."""
    g = torch.Generator().manual_seed(seed)
    earlier = torch.randn(50, n, generator=g, dtype=torch.float64) * 0.5 + 0.2
    return segment_stats_reference(earlier, torch.randint(0, num_groups, (50,), generator=g), num_groups, 0.1)


def _h_in_dtype(pre, up, act, keep):
    """h the way PyTorch computes it at the input precision (the error we compare against)."""
    h = ACTIVATIONS[act](pre)
    if up is not None:
        h = h * up
    return torch.where(keep, h, torch.zeros((), dtype=h.dtype)) if keep is not None else h


def _run_three(pre, up, act, keep, gid, num_groups, sites=("h", "pre", "up"), **kw):
    """(kernel, float64 reference, PyTorch-at-input-precision) results: dict with h and the accumulators."""
    n = pre.shape[1]
    gated = up is not None
    want = {s: s in sites and (s != "up" or gated) for s in ("h", "pre", "up")}
    results = []
    for backend in ("cpp", "reference", "torch_lp"):
        accs = {s: _start_acc(num_groups, n, seed=i) if want[s] else None for i, s in enumerate(("h", "pre", "up"))}
        if backend == "cpp":
            h = act_stats_cpp(pre, up, act, keep, gid, num_groups, 0.1, accs["h"], accs["pre"], accs["up"], True, **kw)
        elif backend == "reference":
            h = reference_backend(pre, up, act, keep, gid, num_groups, 0.1, accs["h"], accs["pre"], accs["up"], False)
            h = ACTIVATIONS[act](pre.double()) * (up.double() if gated else 1.0)
            if keep is not None:
                h = torch.where(keep, h, 0.0)
        else:
            h = _h_in_dtype(pre, up, act, keep)
            gid0 = gid if gid is not None else torch.zeros(pre.shape[0], dtype=torch.int32)
            for s, a in (("h", h), ("pre", pre), ("up", up)):
                if accs[s] is not None:
                    merge_into(accs[s], segment_stats_reference(a.double(), gid0, num_groups, 0.1))
        results.append({"h": h, **accs})
    return results


def _assert_within_torch_error(name, kernel, exact, torch_lp, rel_atol=1e-9, abs_atol=0.0):
    finite = torch.isfinite(exact)
    k, e, t = kernel.double()[finite], exact.double()[finite], torch_lp.double()[finite]
    err_k = (k - e).abs().max().item() if k.numel() else 0.0
    err_t = (t - e).abs().max().item() if t.numel() else 0.0
    atol = abs_atol + (rel_atol * (e.abs().max().item() + 1.0) if e.numel() else 0.0)
    assert err_k <= 2 * err_t + atol, f"{name}: kernel error {err_k:.3e} > 2 x PyTorch's {err_t:.3e} + {atol:.1e}"


def _check(results, h_rel_atol=1e-6):
    cpp, ref, lp = results
    assert cpp["h"].dtype == lp["h"].dtype and cpp["h"].is_contiguous()
    assert torch.equal(torch.isfinite(cpp["h"]), torch.isfinite(lp["h"]))
    _assert_within_torch_error("h", cpp["h"], ref["h"], lp["h"], h_rel_atol)
    for site in ("h", "pre", "up"):
        if ref[site] is None:
            assert cpp[site] is None
            continue
        for name in COUNT_FIELDS:
            assert torch.equal(cpp[site][FIELD_INDEX[name]], ref[site][FIELD_INDEX[name]]), f"{site}.{name} differs"
        # |h| > tau can flip for a value within rounding of tau; allow what PyTorch's own h shows, plus 1.
        _assert_within_torch_error(f"{site}.active", cpp[site][FIELD_INDEX["active"]], ref[site][FIELD_INDEX["active"]],
                                   lp[site][FIELD_INDEX["active"]], rel_atol=0.0, abs_atol=1.0)
        for name in FLOAT_FIELDS:
            _assert_within_torch_error(f"{site}.{name}", cpp[site][FIELD_INDEX[name]], ref[site][FIELD_INDEX[name]], lp[site][FIELD_INDEX[name]])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", list(ACT_CODES))
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
def test_every_activation_and_dtype_matches_float64_reference(dtype, act, gated):
    # N = 600 with 2 threads: two tiles of 304 neurons, each a full 256-neuron chunk and a ragged one;
    # T = 67: two full 32-row blocks and a ragged one.
    t, n, groups = 67, 600, 3
    pre, up, g = _inputs(t, n, dtype, gated, seed=ACT_CODES[act])
    keep = torch.rand(n, generator=g) > 0.25
    gid = torch.randint(-1, groups, (t,), generator=g, dtype=torch.int32)
    _check(_run_three(pre, up, act, keep, gid, groups, num_threads=2))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_inf_empty_groups_and_odd_sizes(dtype):
    t, n, groups = 41, 37, 4  # group 3 never occurs
    pre, up, g = _inputs(t, n, dtype, True, seed=7)
    pre[3, 5], pre[10, 0], pre[11, 36] = float("nan"), float("inf"), float("-inf")
    up[3, 6], up[20, 5] = float("inf"), float("nan")
    gid = torch.randint(-1, 3, (t,), generator=g, dtype=torch.int32)
    gid[3] = gid[10] = gid[11] = gid[20] = 1
    results = _run_three(pre, up, "silu", None, gid, groups)
    _check(results)
    cpp = results[0]
    assert cpp["h"][FIELD_INDEX["nonfinite"], 1].sum() >= 4 and cpp["pre"][FIELD_INDEX["nonfinite"], 1].sum() == 3


def test_all_padding_batch_leaves_statistics_as_reference_does():
    pre, up, _ = _inputs(9, 300, torch.float32, True, seed=3)
    gid = torch.full((9,), -1, dtype=torch.int32)
    cpp, ref, _ = _run_three(pre, up, "gelu", None, gid, 2)
    for site in ("h", "pre", "up"):
        torch.testing.assert_close(cpp[site], ref[site], rtol=1e-15, atol=0)
        torch.testing.assert_close(cpp[site], _start_acc(2, 300, seed=("h", "pre", "up").index(site)), rtol=1e-15, atol=0)


def test_no_group_ids_means_one_group_and_empty_shapes():
    pre, up, _ = _inputs(30, 20, torch.bfloat16, True, seed=4)
    _check(_run_three(pre, up, "gelu_tanh", None, None, 1))
    for t, n in ((0, 20), (5, 0)):
        acc = empty_stats(2, n)
        h = act_stats_cpp(torch.zeros(t, n), None, "silu", None, torch.zeros(t, dtype=torch.int32), 2, 0.1, acc,
                          None, None, True)
        assert h.shape == (t, n) and torch.equal(acc, empty_stats(2, n))


@pytest.mark.parametrize("t, mean, std", [(10_000_000, 100.0, 1.0), (1_000_000, 1e4, 1e-2)])
def test_large_mean_small_std(t, mean, std):
    # docs/OPS.md (precision): activations ~ N(100, 1) over >= 1e7 tokens: std within 1e-3 relative of a float64 two-pass.
    # The second case (|mean| / std = 1e6) fails without the shifted sums, even in float64.
    g = torch.Generator().manual_seed(5)
    x = torch.randn(t, 1, generator=g) * std + mean
    acc = empty_stats(1, 1)
    for part in x.split(3_000_000):  # several calls merging into one accumulator
        act_stats_cpp(part, None, "identity", None, None, 1, 0.1, acc, None, None, False)
    x64 = x.double()
    std_two_pass = (x64 - x64.mean()).pow(2).mean().sqrt().item()
    std = metrics(acc[:, 0])["std"].item()
    assert abs(std / std_two_pass - 1) < 1e-6
    assert acc[FIELD_INDEX["count"], 0, 0].item() == t


def test_repeated_calls_merge_like_one_call():
    pre, up, g = _inputs(300, 130, torch.float32, True, seed=6, mean=3.0)
    gid = torch.randint(-1, 3, (300,), generator=g, dtype=torch.int32)
    one, parts = empty_stats(3, 130), empty_stats(3, 130)
    act_stats_cpp(pre, up, "quick_gelu", None, gid, 3, 0.1, one, None, None, False)
    for lo in range(0, 300, 70):
        act_stats_cpp(pre[lo:lo + 70], up[lo:lo + 70], "quick_gelu", None, gid[lo:lo + 70], 3, 0.1, parts, None, None,
                      False)
    torch.testing.assert_close(parts, one, rtol=1e-12, atol=1e-10)


def test_non_contiguous_inputs_give_the_same_bits():
    pre, up, g = _inputs(50, 90, torch.bfloat16, True, seed=8)
    gid = torch.randint(-1, 2, (50,), generator=g, dtype=torch.int32)
    layouts = {
        "contiguous": (pre, up),
        "row stride > N": (torch.cat([pre, pre], 1)[:, :90], torch.cat([up, up], 1)[:, :90]),
        "transposed": (pre.t().contiguous().t(), up.t().contiguous().t()),
        "neuron stride 2": (pre.repeat_interleave(2, 1)[:, ::2], up.repeat_interleave(2, 1)[:, ::2]),
    }
    outs = {}
    for name, (p, u) in layouts.items():
        acc = empty_stats(2, 90)
        outs[name] = (act_stats_cpp(p, u, "silu", None, gid, 2, 0.1, acc, None, None, True), acc)
    for name, (h, acc) in outs.items():
        assert torch.equal(h, outs["contiguous"][0]) and torch.equal(acc, outs["contiguous"][1]), name


def _bits(x):
    return x.view(torch.int16) if x.element_size() == 2 else x.view(torch.int32) if x.dtype == torch.float32 else x.view(torch.int64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bit_identical_for_any_thread_count_and_isa(dtype):
    pre, up, g = _inputs(77, 2100, dtype, True, seed=9)
    pre[5, 100] = float("nan")
    gid = torch.randint(-1, 3, (77,), generator=g, dtype=torch.int32)
    runs = []
    for threads, avx2 in ((1, True), (2, True), (3, True), (2, False)):
        accs = [empty_stats(3, 2100) for _ in range(3)]
        h = act_stats_cpp(pre, up, "gelu_tanh", None, gid, 3, 0.1, *accs, True, num_threads=threads, allow_avx2=avx2)
        runs.append((h, accs))
    for h, accs in runs[1:]:
        assert torch.equal(_bits(h), _bits(runs[0][0]))
        for a, b in zip(accs, runs[0][1]):
            assert torch.equal(_bits(a), _bits(b))


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_half_rounding_matches_torch_bit_for_bit(dtype):
    # identity * up: the fp32 product of two halves is exact, so only the rounding to dtype differs, if at all.
    info = torch.finfo(dtype)
    special = torch.tensor([0.0, -0.0, info.tiny, info.tiny / 4, info.max, -info.max, float("inf"), float("nan"),
                            1.0 + info.eps / 2, 1.0 + 1.5 * info.eps, 3.0, -7.5])
    g = torch.Generator().manual_seed(10)
    pre = torch.cat([special, torch.randn(500, generator=g) * 1e3]).to(dtype)
    up = torch.cat([torch.tensor([1.0, 1.0, 0.5, 0.25, 1.5, 1.5, 1.0, 1.0, 1.0, 1.0, 1.0 / 3, 1e-3]),
                    torch.randn(500, generator=g)]).to(dtype)
    pre, up = pre.reshape(8, 64), up.reshape(8, 64)
    h = act_stats_cpp(pre, up, "identity", None, None, 1, 0.1, None, None, None, True)
    expected = (pre.float() * up.float()).to(dtype)
    assert torch.equal(torch.isnan(h), torch.isnan(expected)) and torch.isnan(h).any()
    assert torch.equal(_bits(h)[~torch.isnan(h)], _bits(expected)[~torch.isnan(h)])


def test_dispatch_uses_cpp_on_cpu_and_matches_reference(monkeypatch):
    monkeypatch.delenv("MANU_FAST_BACKEND", raising=False)
    pre, up, g = _inputs(20, 33, torch.float32, True, seed=11)
    gid = torch.randint(0, 2, (20,), generator=g)
    assert pick_backend(torch.device("cpu")) == "cpp"
    s_cpp, s_ref = empty_stats(2, 33), empty_stats(2, 33)
    h = act_stats(pre.reshape(4, 5, 33), up.reshape(4, 5, 33), group_ids=gid.reshape(4, 5), stats=s_cpp)
    h_ref = act_stats(pre, up, group_ids=gid, stats=s_ref, backend="reference")
    torch.testing.assert_close(h.reshape(20, 33), h_ref, rtol=3e-6, atol=1e-6)
    torch.testing.assert_close(s_cpp, s_ref, rtol=1e-6, atol=1e-6)
