"""Property test of the op ``act_stats``: random shapes, dtypes, activations, group layouts, masks, strides,
non-finite values and pre-filled accumulators, every available backend against a float64 oracle.

The oracle here is independent of the package: NumPy float64, two-pass over *all* the values an accumulator has
seen (the pre-fill batch and the new one together), so it checks the backends' merge as well as their
statistics — also for the ``reference`` backend (act_stats_reference = segment_stats_reference + merge_into),
which would otherwise only be compared with itself.

Tolerances (as in test_triton.py, after flash-attention): a backend's error against float64 is at most twice
the error of PyTorch computing the same in the input dtype, plus the fp32-accumulation bound of
tests/tolerances.py; counts and non-finite counts are exact; the |a| > tau count may differ only at values
within rounding of tau.
"""
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from manu_fast import act_stats
from manu_fast.activations import ACTIVATIONS
from manu_fast.ops import cpp_available, triton_available
from manu_fast.stats import FIELD_INDEX, FIELDS, NUM_FIELDS, segment_stats_reference
from tolerances import fp32_accumulation_rtol

NEAR_TAU_RTOL = 1e-5  # an fp32 h this close to tau may fall on either side of it


def _backends():
    out = [("reference", 40)]
    if cpp_available():
        out.append(("cpp", 80))
    # the cases are CPU tensors, which only the interpreter takes (compiled Triton needs CUDA pointers; the
    # CUDA kernels are tested in test_triton.py); the interpreter is slow: few, small examples
    if triton_available() and os.environ.get("TRITON_INTERPRET") == "1":
        out.append(("triton", 15))
    return out


@st.composite
def cases(draw, max_tokens: int, max_neurons: int):
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    t = draw(st.integers(0, max_tokens))
    n = draw(st.integers(1, max_neurons))
    gated = draw(st.booleans())
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([0.05, 1.0, 20.0]))
    pre = torch.randn(t, n, generator=g) * scale
    up = torch.randn(t, n, generator=g) if gated else None
    if t and draw(st.booleans()):  # non-finite inputs at a few random places
        for value in draw(st.lists(st.sampled_from([float("nan"), float("inf"), -float("inf")]), min_size=1, max_size=3)):
            pre[torch.randint(t, (1,), generator=g), torch.randint(n, (1,), generator=g)] = value
    if draw(st.booleans()):  # rows strided: a column slice of a wider tensor
        wide = torch.zeros(t, n + 3, dtype=dtype)
        wide[:, 1:n + 1] = pre.to(dtype)
        pre = wide[:, 1:n + 1]
    else:
        pre = pre.to(dtype)
    up = None if up is None else up.to(dtype)
    num_groups = draw(st.integers(1, 4))
    layout = draw(st.sampled_from(["none", "random", "sorted", "all-ignored"]))
    gid = {"none": None,
           "random": torch.randint(-1, num_groups, (t,), generator=g),
           "sorted": torch.randint(0, num_groups, (t,), generator=g).sort().values,
           "all-ignored": torch.full((t,), -1)}[layout]
    if gid is not None:
        gid = gid.to(draw(st.sampled_from([torch.int32, torch.int64])))
    num_groups = 1 if gid is None else num_groups
    keep = (torch.rand(n, generator=g) > 0.3) if draw(st.booleans()) else None
    sites = {"stats": True, "pre_stats": draw(st.booleans()), "up_stats": gated and draw(st.booleans())}
    prefill = draw(st.booleans())  # merge into accumulators that already hold another batch
    tau = draw(st.sampled_from([0.0, 0.1, 0.5]))
    accs, prefills = {}, {}
    for site, on in sites.items():
        if on:
            values = torch.randn(5, n, generator=g, dtype=torch.float64) * 3
            if prefill:
                prefills[site] = values
                accs[site] = segment_stats_reference(values, torch.arange(5) % num_groups, num_groups, tau)
            else:
                accs[site] = torch.zeros(NUM_FIELDS, num_groups, n, dtype=torch.float64)
    three_d = t % 2 == 0 and t > 0 and draw(st.booleans())  # (B, L, N) input with (B, L) group ids
    return dict(pre=pre, up=up, act=draw(st.sampled_from(sorted(ACTIVATIONS))), keep=keep, gid=gid, accs=accs,
                prefills=prefills, tau=tau, write_out=draw(st.booleans()),
                three_d=three_d)


def _hidden(pre, up, act, keep, dtype):
    h = ACTIVATIONS[act](pre.to(dtype))
    if up is not None:
        h = h * up.to(dtype)
    if keep is not None:
        h = torch.where(keep, h, torch.zeros((), dtype=dtype))
    return h


def _numpy_stats(values: np.ndarray, gid: np.ndarray, num_groups: int, tau: float) -> torch.Tensor:
    """The statistics fields of ``values`` (T, N) per group, by the textbook two-pass in NumPy float64."""
    out = np.zeros((NUM_FIELDS, num_groups, values.shape[1]))
    for k in range(num_groups):
        x = values[gid == k]
        fin = np.isfinite(x)
        x0 = np.where(fin, x, 0.0)
        n = fin.sum(0)
        mean = x0.sum(0) / np.maximum(n, 1)
        out[FIELD_INDEX["count"], k], out[FIELD_INDEX["mean"], k] = n, mean
        out[FIELD_INDEX["m2"], k] = (np.where(fin, x - mean, 0.0) ** 2).sum(0)
        out[FIELD_INDEX["sum_abs"], k], out[FIELD_INDEX["sum_sq"], k] = np.abs(x0).sum(0), (x0 * x0).sum(0)
        out[FIELD_INDEX["active"], k], out[FIELD_INDEX["nonfinite"], k] = (np.abs(x0) > tau).sum(0), (~fin).sum(0)
    return torch.from_numpy(out)


def _expected(c, values):
    """Accumulators after the call: the statistics of the pre-fill values and ``values`` (T, N) together."""
    gid = c["gid"].numpy() if c["gid"] is not None else np.zeros(c["pre"].shape[0], dtype=np.int64)
    g = next(iter(c["accs"].values())).shape[1]
    out = {}
    for site in c["accs"]:
        vals, ids = values[site].numpy(), gid
        if site in c["prefills"]:
            vals = np.concatenate([c["prefills"][site].numpy(), vals])
            ids = np.concatenate([np.arange(5) % g, gid])
        out[site] = _numpy_stats(vals, ids, g, c["tau"])
    return out


def _check_stats(name, got, ref, peer, near_tau, bound):
    """``bound``: an upper bound of |value| (every activation has |act(x)| <= |x|); fp32 arithmetic may err by
    a few ulp of it even where a value cancels to almost nothing (gelu far in the negative tail)."""
    n = ref[FIELD_INDEX["count"]].clamp(min=1)
    n_max = float(ref[FIELD_INDEX["count"]].max()) if ref.numel() else 0.0
    scale = {"mean": max((ref[FIELD_INDEX["sum_abs"]] / n).max(), bound), "m2": max(ref[FIELD_INDEX["m2"]].max(), bound ** 2 * n_max),
             "sum_abs": max(ref[FIELD_INDEX["sum_abs"]].max(), bound * n_max), "sum_sq": max(ref[FIELD_INDEX["sum_sq"]].max(), bound ** 2 * n_max)}
    for field in FIELDS:
        i = FIELD_INDEX[field]
        if field in ("count", "nonfinite"):
            assert torch.equal(got[i], ref[i]), f"{name}.{field} differs"
            continue
        err = (got[i] - ref[i]).abs().max().item() if ref[i].numel() else 0.0
        peer_err = (peer[i] - ref[i]).abs().max().item() if ref[i].numel() else 0.0
        rtol = fp32_accumulation_rtol(n_max + float(ref[FIELD_INDEX["nonfinite"]].max()) if ref.numel() else 1)
        allowance = near_tau if field == "active" else rtol * float(scale[field]) if field in scale else 0.0
        assert err <= 2 * peer_err + allowance, f"{name}.{field}: error {err:.3g} > 2 x {peer_err:.3g} + {allowance:.3g}"


def _finite_max(x) -> float:
    if x is None or not x.numel():
        return 0.0
    x = x.double().abs()
    return float(x[torch.isfinite(x)].max()) if torch.isfinite(x).any() else 0.0


def _run_case(backend, c):
    pre, up, gid = c["pre"], c["up"], c["gid"]
    dtype, (t, n) = pre.dtype, pre.shape
    exact = {"stats": _hidden(pre, up, c["act"], c["keep"], torch.float64), "pre_stats": pre.double(),
             "up_stats": None if up is None else up.double()}
    same_dtype = {**exact, "stats": _hidden(pre, up, c["act"], c["keep"], dtype).double()}
    ref, peer = _expected(c, exact), _expected(c, same_dtype)
    accs = {site: acc.clone() for site, acc in c["accs"].items()}
    shape = (2, t // 2, n) if c["three_d"] else (t, n)
    call_gid = None if gid is None else gid.reshape(shape[:-1])
    h = act_stats(pre.reshape(shape), None if up is None else up.reshape(shape), act=c["act"], keep=c["keep"],
                  group_ids=call_gid, tau=c["tau"], write_out=c["write_out"], backend=backend, **accs)
    if c["write_out"]:
        assert h.shape == shape and h.dtype == dtype
        h64, want, torch_h = h.reshape(t, n).double(), exact["stats"], same_dtype["stats"]
        assert torch.equal(torch.isfinite(h64), torch.isfinite(want)), "non-finite outputs at other places"
        fin = torch.isfinite(want)
        err = (h64 - want).abs()[fin].max().item() if fin.any() else 0.0
        torch_err = (torch_h - want).abs()[fin].max().item() if fin.any() else 0.0
        atol = 1e-6 * want[fin].abs().max().item() if fin.any() else 0.0
        assert err <= 2 * torch_err + atol, f"h: error {err:.3g} > 2 x torch {torch_err:.3g} + {atol:.3g}"
    else:
        assert h is None
    bounds = {"pre_stats": _finite_max(pre), "up_stats": _finite_max(up)}
    bounds["stats"] = bounds["pre_stats"] * (bounds["up_stats"] if up is not None else 1.0)
    for site, acc in accs.items():
        values = exact[site]
        near = ((values.abs() - c["tau"]).abs() <= NEAR_TAU_RTOL * values.abs().clamp(min=1.0)) & torch.isfinite(values)
        near_tau = float(near.sum()) if near.numel() else 0.0
        _check_stats(f"{backend}:{site}", acc, ref[site], peer[site], near_tau, bounds[site])


@pytest.mark.parametrize("backend,examples", _backends())
def test_act_stats_matches_the_float64_oracle(backend, examples):
    small = backend == "triton"

    @settings(max_examples=examples, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(cases(max_tokens=12 if small else 48, max_neurons=10 if small else 40))
    def check(c):
        _run_case(backend, c)

    check()
