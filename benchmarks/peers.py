"""The peers manu_fast's fused profiling is measured against, each a real implementation a user could ship.

Statistics peers take the MLP intermediate ``a`` (T, N) and per-token group ids (T,) int32 (-1 = ignore) and
produce the same float64 (NUM_FIELDS, G, N) block as manu_fast (FIELDS order), so every peer is checked
against the fused result:

- ``hooks-stream`` (:class:`StreamStats`): what a competent PyTorch user writes: running float64 totals of
  per-group sums of a, a^2, |a| and [|a| > tau], each one vectorised expression per batch (a one-hot (G, T)
  fp32 matmul with the batch), no Python loop over tokens. Variance comes from the sums (sum_sq/n - mean^2),
  cheaper than Welford/Chan and less accurate when |mean| >> std: the accuracy such code usually accepts.
- ``welford`` (:class:`WelfordStats`): the ``welford-torch`` package (what taker and the MANU code import), one
  float64 ``Welford`` per group fed with ``add_all`` on that group's rows, plus float64 sums of |a|, a^2, [|a|>tau].
- ``hooks-compiled`` (:class:`CompiledStreamStats`): the hooks-stream update under ``torch.compile`` (Inductor
  generates C++/OpenMP on CPU, Triton on CUDA): the peer a torch 2.x user tries first. ``hooks-compiled-masked``
  (:class:`CompiledMaskedStats`) is the formulation Inductor can fuse without a matmul: one masked
  reduction per group and sum, all in one generated kernel.
- ``hooks-store`` (:class:`StoreStats`): the MANU reference style: keep every activation as the model produced
  it, concatenate and reduce (two-pass, fp32) at the end. Memory O(tokens x neurons).

Model peers run a profiling pass (a list of batches) over a model with those statistics in forward pre-hooks on
each MLP's down_proj/fc2 (whose input is the neuron activation ``h``), or with manu_fast's public ``profile()``
(``fused``), or with nothing (``plain``). Token groups are MANU's: ``NUM_KEYS`` data keys (split x modality, one
per batch, round robin) x {image, text} tokens, 8 groups with the default 4 keys.
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, field

import torch
from torch import nn

from manu_fast.adapters import find_mlps, get_patch
from manu_fast.profiler import profile
from manu_fast.stats import DEFAULT_TAU, FIELD_INDEX, empty_stats, group_label

DATA_KEYS = (("forget", "multimodal"), ("forget", "text"), ("retain", "multimodal"), ("retain", "text"))
KINDS = ("image", "text")
NUM_KEYS = len(DATA_KEYS)


def group_labels(num_keys: int = NUM_KEYS) -> list[str]:
    """The profiler's labels for ``num_keys`` data keys: key k's image/text tokens are groups 2k / 2k + 1."""
    return [group_label(s, m, kind) for s, m in DATA_KEYS[:num_keys] for kind in KINDS]


def key_groups(key: int) -> tuple[int, int]:
    """(image group, text group) of data key ``key``."""
    return 2 * key, 2 * key + 1


def one_hot_groups(gid: torch.Tensor, num_groups: int) -> torch.Tensor:
    """(G, T) fp32 indicator of each token's group; ignored tokens (-1) are all-zero columns."""
    return (gid.unsqueeze(0) == torch.arange(num_groups, device=gid.device, dtype=gid.dtype).unsqueeze(1)).float()


class StreamStats:
    name = "hooks-stream"

    def __init__(self, num_groups: int, num_neurons: int, tau: float = DEFAULT_TAU, device=None):
        self.g, self.n, self.tau = num_groups, num_neurons, tau
        self.count = torch.zeros(num_groups, dtype=torch.float64, device=device)
        self.sums = torch.zeros(4, num_groups, num_neurons, dtype=torch.float64, device=device)  # a, a^2, |a|, active

    def update(self, a: torch.Tensor, gid: torch.Tensor) -> None:
        count, sums = _stream_sums(a.reshape(-1, self.n), gid, self.g, self.tau)
        self.count += count
        self.sums += sums

    def block(self) -> torch.Tensor:
        out = empty_stats(self.g, self.n, self.count.device)
        n = self.count.unsqueeze(1).expand(self.g, self.n)
        mean = self.sums[0] / n.clamp(min=1)
        out[FIELD_INDEX["count"]] = n
        out[FIELD_INDEX["mean"]] = mean
        out[FIELD_INDEX["m2"]] = self.sums[1] - n * mean * mean
        out[FIELD_INDEX["sum_abs"]], out[FIELD_INDEX["sum_sq"]], out[FIELD_INDEX["active"]] = self.sums[2], self.sums[1], self.sums[3]
        return out

    def held_bytes(self) -> int:
        return self.count.nbytes + self.sums.nbytes


def _stream_sums(a: torch.Tensor, gid: torch.Tensor, num_groups: int, tau: float):
    """The per-batch update of StreamStats as one function of its inputs (what torch.compile traces)."""
    a = a.float()
    onehot = one_hot_groups(gid, num_groups)
    absa = a.abs()
    return onehot.sum(1), torch.stack([onehot @ a, onehot @ (a * a), onehot @ absa, onehot @ (absa > tau).float()])


def _masked_sums(a: torch.Tensor, gid: torch.Tensor, num_groups: int, tau: float):
    """The same sums as masked per-group reductions (no one-hot matmul): a form Inductor fuses into few kernels."""
    a = a.float()
    absa = a.abs()
    fields = (a, a * a, absa, (absa > tau).float())
    sums, counts = [], []
    for k in range(num_groups):
        m = (gid == k).unsqueeze(1)
        counts.append(m.sum())
        sums.append(torch.stack([torch.where(m, f, 0.0).sum(0) for f in fields]))
    return torch.stack(counts).float(), torch.stack(sums, 1)


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=False)


class CompiledStreamStats(StreamStats):
    name = "hooks-compiled"
    sums_fn = staticmethod(_stream_sums)

    def update(self, a: torch.Tensor, gid: torch.Tensor) -> None:
        count, sums = _compiled(self.sums_fn)(a.reshape(-1, self.n), gid, self.g, self.tau)
        self.count += count
        self.sums += sums


class CompiledMaskedStats(CompiledStreamStats):
    name = "hooks-compiled-masked"
    sums_fn = staticmethod(_masked_sums)


class WelfordStats:
    name = "welford"

    def __init__(self, num_groups: int, num_neurons: int, tau: float = DEFAULT_TAU, device=None):
        from welford_torch import Welford

        self.g, self.n, self.tau = num_groups, num_neurons, tau
        self.welford = [Welford(dtype=torch.float64, device=device) for _ in range(num_groups)]
        self.sums = torch.zeros(3, num_groups, num_neurons, dtype=torch.float64, device=device)  # |a|, a^2, active

    def update(self, a: torch.Tensor, gid: torch.Tensor) -> None:
        a = a.reshape(-1, self.n)
        for k, acc in enumerate(self.welford):
            x = a[gid == k].to(torch.float64)
            if x.shape[0] == 0:  # welford-torch divides by the running count: skip empty groups
                continue
            acc.add_all(x)
            absx = x.abs()
            self.sums[0, k] += absx.sum(0)
            self.sums[1, k] += (x * x).sum(0)
            self.sums[2, k] += (absx > self.tau).sum(0)

    def block(self) -> torch.Tensor:
        out = empty_stats(self.g, self.n, self.sums.device)
        for k, acc in enumerate(self.welford):
            if acc.count:
                out[FIELD_INDEX["count"], k] = acc.count
                out[FIELD_INDEX["mean"], k] = acc.mean
                out[FIELD_INDEX["m2"], k] = acc.var_p * acc.count
        out[FIELD_INDEX["sum_abs"]], out[FIELD_INDEX["sum_sq"]], out[FIELD_INDEX["active"]] = self.sums[0], self.sums[1], self.sums[2]
        return out

    def held_bytes(self) -> int:
        # mean, M2 and welford-torch's two rollback copies of them, per group
        return self.sums.nbytes + sum(4 * acc.mean.nbytes for acc in self.welford if acc.mean is not None)


class StoreStats:
    name = "hooks-store"

    def __init__(self, num_groups: int, num_neurons: int, tau: float = DEFAULT_TAU, device=None):
        self.g, self.n, self.tau, self.device = num_groups, num_neurons, tau, device
        self.acts: list[torch.Tensor] = []
        self.gids: list[torch.Tensor] = []

    def update(self, a: torch.Tensor, gid: torch.Tensor) -> None:
        self.acts.append(a.detach().reshape(-1, self.n))
        self.gids.append(gid)

    def block(self) -> torch.Tensor:
        out = empty_stats(self.g, self.n, self.device)
        if not self.acts:
            return out
        acts, gid = torch.cat(self.acts), torch.cat(self.gids)
        for k in range(self.g):
            x = acts[gid == k].float()
            if x.shape[0] == 0:
                continue
            mean = x.mean(0)
            absx = x.abs()
            out[FIELD_INDEX["count"], k] = x.shape[0]
            out[FIELD_INDEX["mean"], k] = mean
            out[FIELD_INDEX["m2"], k] = ((x - mean) ** 2).sum(0)
            out[FIELD_INDEX["sum_abs"], k] = absx.sum(0)
            out[FIELD_INDEX["sum_sq"], k] = (x * x).sum(0)
            out[FIELD_INDEX["active"], k] = (absx > self.tau).sum(0)
        return out

    def held_bytes(self) -> int:
        return sum(t.nbytes for t in self.acts) + sum(t.nbytes for t in self.gids)


# welford-torch is a pip extra ("bench"); where it is missing (e.g. an offline GPU image) that peer is left out.
STATS_PEERS = {cls.name: cls for cls in (StreamStats, CompiledStreamStats, CompiledMaskedStats, WelfordStats, StoreStats)
               if cls is not WelfordStats or importlib.util.find_spec("welford_torch") is not None}


def llava_like_group_ids(tokens: int, num_groups: int, device) -> torch.Tensor:
    """One call's token groups as a profiling batch lays them out, the last data key's: 75 % image tokens, then
    text, the last 1/16 ignored (padding)."""
    image, text = key_groups(num_groups // 2 - 1)
    gid = torch.full((tokens,), text, dtype=torch.int32)
    gid[: tokens * 3 // 4] = image
    gid[tokens - tokens // 16:] = -1
    return gid.to(device)


def lm_group_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image_token: int,
                 key: int = 0) -> torch.Tensor:
    """Per-position group of the language model's tokens of data key ``key``: image / text, -1 for padding
    (flattened, int32)."""
    image, text = key_groups(key)
    gid = torch.where(input_ids == image_token, image, text).to(torch.int32)
    if attention_mask is not None:
        gid = gid.masked_fill(attention_mask == 0, -1)
    return gid.reshape(-1)


@dataclass
class Batch:
    """One forward of a profiling pass: the model kwargs (with ``input_ids``/``attention_mask``, the language-model
    token layout), the cheap-forward extras the peers add (manu_fast's ``profile()`` adds its own), and the data
    key (index into DATA_KEYS) the batch belongs to."""

    kwargs: dict
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    extra: dict = field(default_factory=dict)
    key: int = 0

    @property
    def lm_tokens(self) -> int:
        return self.input_ids.numel()


@dataclass
class RunResult:
    blocks: dict[str, torch.Tensor] | None  # MLP module name -> (NUM_FIELDS, G, N) block of its hidden activation
    held_bytes: int                          # statistics state held at the end of the pass (before reduction)


class PlainPeer:
    """The uninstrumented forward: the lower bound."""

    name = "plain"

    def run(self, model: nn.Module, batches: list[Batch]) -> RunResult:
        with torch.no_grad():
            for b in batches:
                model(**b.kwargs, **b.extra)
        return RunResult(None, 0)


class HookPeer:
    """A statistics peer in forward pre-hooks on every MLP's output projection (its input is the hidden activation)."""

    def __init__(self, stats_name: str, image_token: int, tau: float = DEFAULT_TAU, num_keys: int = NUM_KEYS):
        self.stats_cls = STATS_PEERS[stats_name]
        self.name, self.image_token, self.tau, self.num_keys = stats_name, image_token, tau, num_keys

    def run(self, model: nn.Module, batches: list[Batch]) -> RunResult:
        stats, handles, state = {}, [], {}

        def make_hook(name: str, tower: str):
            def hook(_module, args):
                a = args[0]
                t = a.shape[:-1].numel()
                if tower == "language":
                    gid = state["lm"]
                    if gid.numel() != t:
                        raise RuntimeError(f"{name}: {t} tokens, batch layout has {gid.numel()}")
                else:  # vision tower and projector tokens are all image tokens
                    gid = state.setdefault(("vision", t), torch.full((t,), key_groups(state["key"])[0],
                                                                     dtype=torch.int32, device=a.device))
                stats[name].update(a, gid)
            return hook

        for info in find_mlps(model):
            out_linear = info.out_linear
            stats[info.name] = self.stats_cls(2 * self.num_keys, info.neurons, self.tau, out_linear.weight.device)
            handles.append(out_linear.register_forward_pre_hook(make_hook(info.name, info.tower)))
        try:
            with torch.no_grad():
                for b in batches:
                    state.clear()
                    state["key"] = b.key
                    state["lm"] = lm_group_ids(b.input_ids, b.attention_mask, self.image_token, b.key)
                    model(**b.kwargs, **b.extra)
                held = sum(s.held_bytes() for s in stats.values())
                return RunResult({name: s.block() for name, s in stats.items()}, held)
        finally:
            for h in handles:
                h.remove()


class FusedPeer:
    """manu_fast as a user runs it: the public ``profile(model, {(split, modality): batches})``, which patches the
    model's MLPs with the fused layers (C++ on CPU, Triton on CUDA via the dispatch). The model is unpatched
    afterwards if it was not patched before."""

    name = "fused"

    def __init__(self, tau: float = DEFAULT_TAU, num_keys: int = NUM_KEYS):
        self.tau, self.num_keys = tau, num_keys

    def run(self, model: nn.Module, batches: list[Batch]) -> RunResult:
        was_patched = get_patch(model) is not None
        data = {key: [] for key in DATA_KEYS[:self.num_keys]}
        for b in batches:
            data[DATA_KEYS[b.key]].append(b.kwargs)
        data = {key: kwargs for key, kwargs in data.items() if kwargs}
        try:
            stats = profile(model, data, tau=self.tau, progress=False)
            blocks = {}
            order = [group_labels(self.num_keys).index(label) for label in stats.groups]
            for key, block in stats.blocks.items():  # onto the peers' group numbering (profile() numbers its keys)
                full = empty_stats(2 * self.num_keys, block.shape[-1], block.device)
                full[:, order] = block
                blocks[key.split("::")[0]] = full
            return RunResult(blocks, sum(block.nbytes for block in stats.blocks.values()))
        finally:
            if not was_patched and get_patch(model) is not None:
                get_patch(model).unpatch()


def model_peers(image_token: int, num_keys: int = NUM_KEYS, stats_peers=None) -> list:
    """The peers of a model-level comparison, ``fused`` right after ``plain`` (the others are checked against it);
    ``stats_peers`` limits the hook peers (default: every one of STATS_PEERS)."""
    names = STATS_PEERS if stats_peers is None else [n for n in stats_peers if n in STATS_PEERS]
    return [PlainPeer(), FusedPeer(num_keys=num_keys), *(HookPeer(name, image_token, num_keys=num_keys) for name in names)]


def tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, active_rtol) for comparing statistics of the same activations computed by two implementations.

    fp32: both see h to within a few ulp and sum in >= fp32, so 1e-4 is far above rounding. bf16: HF rounds
    act(g) and act(g)*u to bf16 (two roundings of 2^-8 each) while the fused op keeps h in fp32 until its output,
    so sum a^2 may differ by up to 4 * 2^-8 relative; about that fraction of |a| > tau decisions near tau may flip.
    """
    if dtype == torch.float32:
        return 1e-4, 1e-4
    return 4 * 2.0 ** -8, 1e-2


def model_peers_checked(runs: dict) -> list[str]:
    """The peers of ``runs`` whose statistics are compared with ``fused``'s."""
    return [name for name, run in runs.items() if name != "fused" and isinstance(run, RunResult) and run.blocks]


def assert_blocks_close(ref: torch.Tensor, got: torch.Tensor, rtol: float, active_rtol: float, what: str) -> None:
    """Sanity check of one statistics block against another (fused vs a peer).

    Counts must match exactly; mean within rtol of mean |a|; sum |a| and sum a^2 within rtol; variance within rtol of
    the mean square; the |a| > tau counts within active_rtol of the token count (values near tau may round across it).
    """
    ref, got = ref.double().cpu(), got.double().cpu()
    n = ref[FIELD_INDEX["count"]]
    if not torch.equal(n, got[FIELD_INDEX["count"]]):
        raise AssertionError(f"{what}: token counts differ: {n[:, 0].tolist()} vs {got[FIELD_INDEX['count'], :, 0].tolist()}")
    safe = n.clamp(min=1)
    mean_abs, mean_sq = ref[FIELD_INDEX["sum_abs"]] / safe, ref[FIELD_INDEX["sum_sq"]] / safe
    checks = {
        "mean": ((got[FIELD_INDEX["mean"]] - ref[FIELD_INDEX["mean"]]).abs(), rtol * mean_abs + 1e-12),
        "sum_abs": ((got[FIELD_INDEX["sum_abs"]] - ref[FIELD_INDEX["sum_abs"]]).abs(), rtol * ref[FIELD_INDEX["sum_abs"]] + 1e-12),
        "sum_sq": ((got[FIELD_INDEX["sum_sq"]] - ref[FIELD_INDEX["sum_sq"]]).abs(), rtol * ref[FIELD_INDEX["sum_sq"]] + 1e-12),
        "var": ((got[FIELD_INDEX["m2"]] - ref[FIELD_INDEX["m2"]]).abs() / safe, rtol * mean_sq + 1e-12),
        "active": ((got[FIELD_INDEX["active"]] - ref[FIELD_INDEX["active"]]).abs(), active_rtol * n + 2),
    }
    for field_name, (err, tol) in checks.items():
        bad = err > tol
        if bad.any():
            i = int(bad.flatten().nonzero()[0])
            raise AssertionError(f"{what}: field {field_name} differs at {int(bad.sum())} places, e.g. flat index {i}: "
                                 f"|diff| {err.flatten()[i]:.3g} > tol {tol.flatten()[i]:.3g}")
