"""Data-parallel profiling: 2 CPU processes (torchrun, gloo) give the statistics of a single-process run on
the same data, to float64 round-off; failures on one rank reach every rank instead of hanging them.
Model-parallel: models dispatched by accelerate (device_map with a disk-offloaded layer, cpu_offload, a hook
on an MLP itself) profile to exactly the statistics of the in-memory model, kept on each layer's device.

Run under torchrun, this file is the worker: ``torchrun --standalone --nproc_per_node 2 test_distributed.py OUT``.
"""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny_models as tm
from manu_fast.adapters import get_patch
from manu_fast.profiler import profile
from manu_fast.stats import FIELD_INDEX, NeuronStats

HERE = Path(__file__).resolve().parent
SITES = ("hidden", "pre")


def _setup():
    model = tm.build("llava")
    data = {("forget", "multimodal"): [tm.inputs("llava", model, seed=s) for s in (1, 2, 3)],
            ("retain", "text"): [tm.inputs("llava", model, multimodal=False, seed=s) for s in (4, 5, 6)],
            ("retain", "multimodal"): [tm.inputs("llava", model, seed=7)]}  # rank 1's shard of it is empty
    return model, data


def _worker(out: Path) -> None:
    from manu_fast import distributed as mdist
    model, data = _setup()
    rank, world = mdist.init("gloo")  # 2 CPU processes, also on a machine with one GPU (NCCL would need two)
    shards = {key: mdist.Shard(batches) for key, batches in data.items()}
    stats = profile(model, shards, sites=SITES, progress=False, distributed=True)
    mdist.save_stats(stats, out / "dp.safetensors")
    stats.save(out / f"rank{rank}.safetensors")  # every rank must hold the same merged statistics

    # the same merge through a tiny gather budget (one block per collective) gives the same bits
    mdist.GATHER_BUDGET_BYTES = 1
    chunked = profile(model, shards, sites=SITES, progress=False, distributed=True)
    assert all(torch.equal(chunked.blocks[k], stats.blocks[k]) for k in stats.blocks), "chunked merge differs"

    # the same keys listed in a different order on each rank (a resumed rank's come back key-sorted)
    counts = {"forget": 1, "retain": 2} if rank == 0 else {"retain": 20, "forget": 10}
    assert mdist.sum_counts(counts) == {"forget": 11, "retain": 22}, "counts summed under the wrong keys"

    messages = []
    bad_rank_data = dict(shards)
    if rank == 1:  # a failure on one rank only: a profile_mask of the wrong shape
        batch = dict(data[("retain", "text")][0], profile_mask=torch.ones(1, 1, dtype=torch.bool))
        bad_rank_data[("retain", "text")] = [batch]
    for case, kwargs in (("one rank fails", dict(data=bad_rank_data)),
                         ("layouts differ", dict(data=shards if rank == 0 else {("forget", "multimodal"): shards[("forget", "multimodal")]})),
                         ("empty everywhere", dict(data={**shards, ("forget", "text"): []})),
                         ("weights differ", dict(data=shards, model=tm.build("llava", seed=rank)))):
        try:
            profile(kwargs.get("model", model), kwargs["data"], progress=False, distributed=True)
            messages.append(f"{case}: no error")
        except Exception as e:  # noqa: BLE001 - the message is what the test checks
            messages.append(f"{case}: {type(e).__name__}: {e}")
    (out / f"errors{rank}.txt").write_text("\n".join(messages))
    torch.distributed.destroy_process_group()


def test_two_gloo_ranks_equal_one_process(tmp_path):
    # own session, so that a hang kills torchrun and both workers, not torchrun alone
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(Path(__file__).resolve()), str(tmp_path)], cwd=HERE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
    assert proc.returncode == 0, output[-5000:]

    # torchrun runs each worker with OMP_NUM_THREADS=1; the same here, so that the fp32 forwards are bit-identical
    # and only the float64 merge order differs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, data = _setup()
        single = profile(model, data, sites=SITES, progress=False)
    finally:
        torch.set_num_threads(threads)
    dp = NeuronStats.load(tmp_path / "dp.safetensors", expect_fingerprint=single.fingerprint)
    rank1 = NeuronStats.load(tmp_path / "rank1.safetensors")
    assert dp.groups == single.groups and set(dp.blocks) == set(single.blocks)
    for key, ref in single.blocks.items():
        assert torch.equal(dp.blocks[key], rank1.blocks[key]), f"ranks disagree on {key}"
        assert torch.equal(dp.blocks[key][FIELD_INDEX["count"]], ref[FIELD_INDEX["count"]]), key
        assert torch.equal(dp.blocks[key][FIELD_INDEX["active"]], ref[FIELD_INDEX["active"]]), key
        # sums of O(1) values over <= 100 tokens: float64 reordering error ~1e-14 relative to the magnitude
        scale = ref.abs().amax(dim=-1, keepdim=True).clamp(min=1.0)
        torch.testing.assert_close(dp.blocks[key] / scale, ref / scale, rtol=0, atol=1e-12)
    assert single.block("model.language_model.layers.0.mlp")[FIELD_INDEX["count"], single.groups.index("forget/multimodal/image")].min() > 0

    errors = [(tmp_path / f"errors{r}.txt").read_text().splitlines() for r in (0, 1)]
    assert "one rank fails: DistributedError: profiling failed on rank(s) [1]" in errors[0][0]
    assert "profile_mask has shape" in errors[1][0]
    assert all("profiled other groups" in e[1] for e in errors)
    assert all("forget/text data yielded no batch" in e[2] for e in errors)
    assert "ranks [1] profiled a model with other weights" in errors[0][3]
    assert "ranks [0] profiled a model with other weights" in errors[1][3]


def _stalled_worker(out: Path) -> None:
    """Rank 1 stalls (a data loader that hangs) longer than the timeout: rank 0 fails instead of waiting forever."""
    import time
    from manu_fast import distributed as mdist
    model, data = _setup()
    rank, _ = mdist.init("gloo", timeout_s=STALL_TIMEOUT_S)
    shards = {key: mdist.Shard(batches) for key, batches in data.items()}
    if rank == 1:
        time.sleep(3 * STALL_TIMEOUT_S)
    start = time.perf_counter()
    try:
        profile(model, shards, progress=False, distributed=True)
        message = "no error"
    except Exception as e:  # noqa: BLE001 - the message is what the test checks
        message = f"{type(e).__name__} after {time.perf_counter() - start:.0f} s: {e}"
    (out / f"stall{rank}.txt").write_text(message)


STALL_TIMEOUT_S = 4


@pytest.mark.slow
def test_a_stalled_rank_is_an_error_after_the_timeout_not_a_hang(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(Path(__file__).resolve()), str(tmp_path), "stall"], cwd=HERE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("the run hung")
    message = (tmp_path / "stall0.txt").read_text()
    assert message.startswith("DistributedError after ") and "another rank stalled past the timeout" in message, message
    assert float(message.split(" after ")[1].split()[0]) < 3 * STALL_TIMEOUT_S, message


def _llama_and_data():
    model = tm.build("llama")
    return model, {("forget", "text"): [tm.inputs("llama", model, seed=s) for s in (1, 2)],
                   ("retain", "text"): [tm.inputs("llama", model, seed=3)]}


def test_model_dispatched_by_accelerate_profiles_exactly_like_in_memory(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    model, data = _llama_and_data()
    reference = profile(model, data, sites=("hidden", "out"), progress=False)

    def check(dispatched):
        stats = profile(dispatched, data, sites=("hidden", "out"), progress=False)
        for key, ref in reference.blocks.items():
            assert stats.blocks[key].device.type == "cpu"  # the execution device, not "meta"
            assert torch.equal(stats.blocks[key], ref), key

    # a device_map with layer 1 offloaded to disk: its weights are on "meta" until its hooks load them
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    on_disk = accelerate.dispatch_model(tm.build("llama"), device_map=device_map, offload_dir=tmp_path / "offload")
    assert on_disk.model.layers[1].mlp.down_proj.weight.device.type == "meta"
    check(on_disk)
    # the whole model offloaded to CPU memory (every weight on "meta" between calls)
    check(accelerate.cpu_offload(tm.build("llama"), execution_device="cpu"))


def test_accelerate_hook_on_an_mlp_survives_patching():
    """device_map entries at MLP granularity put the device-moving hook on the MLP module itself, which patching
    replaces; the fused layer must carry it on. Observable on CPU with a hook that scales the MLP's input."""
    hooks = pytest.importorskip("accelerate.hooks")

    class ScaleInput(hooks.ModelHook):
        def pre_forward(self, module, x):
            return (2 * x,), {}

    model, data = _llama_and_data()
    kw = data[("forget", "text")][0]
    hooks.add_hook_to_module(model.model.layers[0].mlp, ScaleInput())
    with torch.no_grad():
        hooked = model(**kw).logits
    profile(model, data, progress=False)  # patches the model
    assert hasattr(get_patch(model).layers["model.layers.0.mlp"], "_hf_hook")
    with torch.no_grad():
        torch.testing.assert_close(model(**kw).logits, hooked, rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    (_stalled_worker if sys.argv[2:] == ["stall"] else _worker)(Path(sys.argv[1]))
