"""Data-parallel profiling on ``torch.distributed`` (torchrun; NCCL on GPUs, gloo on CPU).

Each rank profiles its shard of the data (``Shard``), then ``all_reduce_stats`` merges the statistics of
every rank exactly: the (NUM_FIELDS, G, N) float64 blocks are all-gathered and merged with Chan's formula
(``manu_fast.stats.merge_partials``) in rank order, so every rank gets the same, deterministic whole-data
statistics (mean/M2 are not plain sums, so a plain all-reduce would be wrong). Rank 0 writes the file
(``save_stats``). ``manu_fast.profiler.profile(..., distributed=True)`` does all of this; see
docs/ROBUSTNESS.md for the torchrun command.

No pickle crosses the process group: layouts are compared by hash and failures signalled by flags.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from .stats import NeuronStats, merge_partials

DEFAULT_TIMEOUT_S = 30 * 60  # a collective waiting longer than this for a rank fails on every rank
GATHER_BUDGET_BYTES = 256 * 2**20  # per-rank bytes of statistics gathered at once (world x this in flight)


class DistributedError(RuntimeError):
    """A distributed run that cannot go on: not launched by torchrun, or another rank failed."""


@contextlib.contextmanager
def _collective(what: str):
    """A collective whose failure (a rank that stalled past the timeout, or died) is a DistributedError saying so."""
    try:
        yield
    except RuntimeError as e:
        if isinstance(e, DistributedError):
            raise
        raise DistributedError(f"{what} failed on this rank: another rank stalled past the timeout (init(timeout_s=...), "
                               f"--dist-timeout) or died ({' '.join(str(e).split())[:300]})") from e


def _dist():
    import torch.distributed as dist
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed support")
    return dist


def init(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[int, int]:
    """Initialise the default process group from torchrun's environment if needed; return (rank, world size).

    Backend: ``nccl`` when CUDA is available (each process on cuda:LOCAL_RANK), else ``gloo``. ``timeout_s``: how long
    a collective waits for a stalled or dead rank before every rank fails with an error (instead of hanging)."""
    if not 0 < timeout_s < float("inf"):
        raise ValueError(f"the distributed timeout must be a positive number of seconds, got {timeout_s}")
    dist = _dist()
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise DistributedError("distributed profiling needs torch.distributed: launch with torchrun (it sets RANK, "
                               "WORLD_SIZE, MASTER_ADDR...) or call torch.distributed.init_process_group first")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) when none is initialised."""
    dist = _dist()
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


class Shard:
    """The batches of ``batches`` that this rank profiles: every ``world_size``-th one, from index ``rank``.

    Re-iterable when ``batches`` is (a list, a DataLoader). Prefer it to a DistributedSampler, which pads the
    data with repeated samples (drop_last=False) that would be counted twice in the statistics."""

    def __init__(self, batches: Iterable[dict], rank: int | None = None, world_size: int | None = None):
        default_rank, default_world = rank_and_world()
        self.batches = batches
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, {self.world_size})")

    def __iter__(self) -> Iterator[dict]:
        for i, batch in enumerate(self.batches):
            if i % self.world_size == self.rank:
                yield batch


def rank_path(path, rank: int, world_size: int) -> Path:
    """The per-rank checkpoint file of ``path``: ``stem.rank<r>-of-<w>.suffix``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.rank{rank}-of-{world_size}{path.suffix}")


def comm_device(group=None) -> torch.device:
    """Where collective tensors must live: the current CUDA device under NCCL, else the CPU."""
    if _dist().get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def raise_if_any_rank_failed(error: BaseException | None, group=None) -> None:
    """Collective: re-raise this rank's ``error``, or raise if another rank failed, so that no rank hangs."""
    dist = _dist()
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int64, device=comm_device(group))
    flags = [torch.empty_like(flag) for _ in range(dist.get_world_size(group))]
    with _collective("the exchange of failure flags"):
        dist.all_gather(flags, flag, group=group)
    if error is not None:
        raise error
    failed = [r for r, f in enumerate(flags) if int(f.item())]
    if failed:
        raise DistributedError(f"profiling failed on rank(s) {failed}; see their error output")


def sum_counts(counts: dict[str, int], group=None) -> dict[str, int]:
    """Collective: sum integer counts with the same keys over the ranks; the result is in ``counts``' key order.

    Reduced in sorted key order: the ranks' dicts may list the keys in different orders (a resumed rank's
    position comes back key-sorted from its checkpoint, a fresh rank's is in data order)."""
    dist = _dist()
    keys = sorted(counts)
    t = torch.tensor([counts[k] for k in keys], dtype=torch.int64, device=comm_device(group))
    with _collective("summing the batch counts"):
        dist.all_reduce(t, group=group)
    totals = dict(zip(keys, t.tolist()))
    return {k: totals[k] for k in counts}


def _digest(value) -> list[int]:
    return list(hashlib.sha256(json.dumps(value, sort_keys=True).encode()).digest())


def check_same_layout(stats: NeuronStats, group=None, run: dict | None = None) -> None:
    """Collective: raise ValueError on every rank unless all ranks hold statistics of the same layout
    (model fingerprint, groups, tau, layers, sites) and, given ``run`` (``manu_fast.profiler.run_identity``), the
    same weights and dtype; compared by SHA-256 digests."""
    dist = _dist()
    layout = {"groups": stats.groups, "tau": repr(float(stats.tau)), "fingerprint": stats.fingerprint,
              "blocks": [[k, list(b.shape)] for k, b in stats.blocks.items()]}
    digest = torch.tensor(_digest(layout) + _digest(run), dtype=torch.uint8, device=comm_device(group))
    digests = [torch.empty_like(digest) for _ in range(dist.get_world_size(group))]
    with _collective("the layout check"):
        dist.all_gather(digests, digest, group=group)
    rank = dist.get_rank(group)
    differ = [r for r, d in enumerate(digests) if not torch.equal(d[:32], digest[:32])]
    if differ:
        raise ValueError(f"rank {rank}: ranks {differ} profiled other groups, tau, layers or sites "
                         "than this one; every rank must call profile with the same model, data keys, sites, towers and tau")
    differ = [r for r, d in enumerate(digests) if not torch.equal(d[32:], digest[32:])]
    if differ:
        raise ValueError(f"rank {rank}: ranks {differ} profiled a model with other weights or another dtype than "
                         "this one (weights digest differs); every rank must load the same model files and --dtype")


def _chunks(keys: list[str], sizes: list[int], budget: int) -> list[list[str]]:
    out, cur, used = [], [], 0
    for key, size in zip(keys, sizes):
        if cur and used + size > budget:
            out.append(cur)
            cur, used = [], 0
        cur.append(key)
        used += size
    return out + ([cur] if cur else [])


def all_reduce_stats(stats: NeuronStats, group=None, budget_bytes: int | None = None) -> NeuronStats:
    """Collective: merge every rank's ``stats`` exactly, in place; every rank ends with the same result.

    Blocks are concatenated along neurons into buffers of at most ``budget_bytes`` (default
    ``GATHER_BUDGET_BYTES``, read at call time), all-gathered in float64
    and merged in rank order with ``merge_partials``, then copied back to each block's own device.
    Refuses (ValueError) when the ranks profiled different models, groups, tau, layers or sites."""
    dist = _dist()
    world = dist.get_world_size(group)
    dev = comm_device(group)
    check_same_layout(stats, group)
    keys = list(stats.blocks)
    sizes = [stats.blocks[k].numel() * stats.blocks[k].element_size() for k in keys]
    for chunk in _chunks(keys, sizes, GATHER_BUDGET_BYTES if budget_bytes is None else budget_bytes):
        local = torch.cat([stats.blocks[k].to(dev) for k in chunk], dim=2).contiguous()
        parts = [torch.empty_like(local) for _ in range(world)]
        with _collective("the statistics merge"):
            dist.all_gather(parts, local, group=group)
        merged = merge_partials(torch.stack(parts))
        widths = [stats.blocks[k].shape[2] for k in chunk]
        for key, part in zip(chunk, merged.split(widths, dim=2)):
            stats.blocks[key].copy_(part)
    return stats


def save_stats(stats: NeuronStats, path, group=None) -> None:
    """Rank 0 writes ``stats`` to ``path`` (atomically); every rank returns once it is written."""
    rank, _ = rank_and_world()
    error = None
    if rank == 0:
        try:
            stats.save(path)
        except Exception as e:  # noqa: BLE001 - handed to every rank below, so that none waits forever
            error = e
    if _dist().is_initialized():
        raise_if_any_rank_failed(error, group)
    elif error is not None:
        raise error
