"""Session fixtures of the benchmark suite: the device, the sizes of this mode, and the results recorder."""
from __future__ import annotations

import pytest
import torch

from .harness import Results, bench_device, bench_mode, environment, out_dir
from .workloads import sizes as mode_sizes


@pytest.fixture(scope="session")
def device() -> torch.device:
    return bench_device()


@pytest.fixture(scope="session")
def sizes(device):
    return mode_sizes(bench_mode(), device)


@pytest.fixture(scope="session")
def results(device):
    res = Results(environment(device), out_dir())
    print(f"\nmanu_fast benchmarks: {res.env}\nresults -> {res.out}", flush=True)
    yield res
    res.finish()


@pytest.fixture(autouse=True)
def _seed_and_free(device):
    torch.manual_seed(0)
    yield
    if device.type == "cuda":
        torch.cuda.empty_cache()
