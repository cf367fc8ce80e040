"""Resumable profiling: a run SIGKILLed mid-batch and resumed ends with exactly the statistics of an
uninterrupted run (no batch counted twice or lost); checkpoints of another run are refused.

Run as a script, this file is the worker that gets killed: ``python test_resume.py CKPT KILL_AT``.
"""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny_models as tm
from manu_fast.profiler import CHECKPOINT_KEY, load_checkpoint, profile, save_checkpoint
from manu_fast.stats import NeuronStats, StatsFileError

HERE = Path(__file__).resolve().parent
BATCHES = {("forget", "text"): 3, ("retain", "text"): 4}
EVERY = 2
SITES = ("hidden", "up")


def _setup():
    torch.manual_seed(0)
    model = tm.build("llama")
    data = {key: [tm.inputs("llama", model, batch=2, text_len=9, seed=10 * i + len(key[0])) for i in range(n)]
            for key, n in BATCHES.items()}
    return model, data


def _run(model, data, ckpt, **kw):
    return profile(model, data, sites=SITES, checkpoint=ckpt, checkpoint_every=EVERY, resume=True, progress=False, **kw)


def _kill_during_mlp_call(model, call: int) -> None:
    """SIGKILL this process in the middle of the ``call``-th forward (inside layer 1's MLP, after layer 0's
    statistics of that batch were merged in memory): the harshest point to die. Hooked on down_proj, a
    Linear that patching keeps (the MLP module itself is replaced by a fused one)."""
    calls = [0]

    def hook(module, args):
        calls[0] += 1
        if calls[0] == call:
            os.kill(os.getpid(), signal.SIGKILL)

    model.get_submodule("model.layers.1.mlp.down_proj").register_forward_pre_hook(hook)  # survives patching


def _assert_bit_equal(a: NeuronStats, b: NeuronStats) -> None:
    assert a.groups == b.groups and set(a.blocks) == set(b.blocks)
    for k in a.blocks:
        assert torch.equal(a.blocks[k], b.blocks[k]), k


def _killed_run(ckpt: Path, kill_at: int) -> None:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(ckpt), str(kill_at)], cwd=HERE,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def test_killed_run_resumes_to_exactly_the_uninterrupted_statistics(tmp_path):
    model, data = _setup()
    reference = profile(model, data, sites=SITES, progress=False)

    ckpt = tmp_path / "ckpt.safetensors"
    _killed_run(ckpt, kill_at=6)  # batches: f1 f2 [save] f3 r1 [save] r2 r3<killed>
    partial = NeuronStats.load(ckpt)
    probe_model, _ = _setup()
    position = load_checkpoint(ckpt, profile_stats_like(probe_model, data))
    assert position == {"forget/text": 3, "retain/text": 1}
    assert not list(tmp_path.glob("*.tmp")), "a temporary checkpoint file was left behind"
    counted = partial.block("model.layers.0.mlp")[0].sum().item()
    assert 0 < counted < reference.block("model.layers.0.mlp")[0].sum().item()

    resumed_model, resumed_data = _setup()
    resumed = _run(resumed_model, resumed_data, ckpt)
    _assert_bit_equal(resumed, reference)

    # the checkpoint is now complete: resuming again runs no batch and gives the same statistics
    again_model, again_data = _setup()
    _kill_during_mlp_call(again_model, call=1)  # any forward would kill the test process itself
    model_calls = []
    again_model.register_forward_pre_hook(lambda m, a: model_calls.append(1))
    again = _run(again_model, again_data, ckpt)
    assert not model_calls
    _assert_bit_equal(again, reference)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1])
def test_killed_at_random_points_again_and_again_resumes_exactly(tmp_path, seed):
    """Killed at a random forward, resumed and killed again at another random forward (the resumed process's own
    count), until a run ends: the statistics are bit-equal to an uninterrupted run's."""
    import random
    rng = random.Random(seed)
    model, data = _setup()
    reference = profile(model, data, sites=SITES, progress=False)
    ckpt = tmp_path / "ckpt.safetensors"
    for _ in range(3):
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(ckpt), str(rng.randint(1, 4))],
                              cwd=HERE, capture_output=True, text=True, timeout=120)
        if proc.returncode != -signal.SIGKILL:  # this run had fewer batches left than its kill point
            break
    resumed_model, resumed_data = _setup()
    _assert_bit_equal(_run(resumed_model, resumed_data, ckpt), reference)
    assert not list(tmp_path.glob("*.tmp"))


def profile_stats_like(model, data):
    """Empty statistics with this run's layout, to read a checkpoint's position into."""
    from manu_fast.profiler import Profiler
    from manu_fast.stats import group_label
    groups = [group_label(s, m, k) for (s, m) in data for k in ("image", "text")]
    return Profiler(model, groups, sites=SITES).stats


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    model, data = _setup()
    ckpt = tmp_path / "ckpt.safetensors"
    profile(model, data, sites=SITES, checkpoint=ckpt, progress=False)
    with pytest.raises(StatsFileError, match="tau"):
        _run(model, data, ckpt, tau=0.2)
    with pytest.raises(StatsFileError, match="groups"):
        _run(model, {("retain", "text"): data[("retain", "text")], ("forget", "text"): data[("forget", "text")]}, ckpt)
    with pytest.raises(StatsFileError, match="layers/sites"):
        profile(model, data, sites=("hidden",), checkpoint=ckpt, resume=True, progress=False)
    other = tm.build("qwen2")
    with pytest.raises(StatsFileError, match="made for a .llama. model .*, this model is a .qwen2."):
        _run(other, data, ckpt)
    with pytest.raises(ValueError, match="yields only 2"):
        _run(model, {("forget", "text"): data[("forget", "text")], ("retain", "text"): data[("retain", "text")][:2]}, ckpt)
    stats = profile_stats_like(model, data)
    save_checkpoint(tmp_path / "r.safetensors", stats, {"forget/text": 1}, rank=0, world_size=2)
    with pytest.raises(StatsFileError, match="rank 0 of 2, this process is rank 0 of 4"):
        load_checkpoint(tmp_path / "r.safetensors", stats, rank=0, world_size=4)
    plain = tmp_path / "plain.safetensors"
    NeuronStats.load(ckpt).save(plain)  # a statistics file without a resume position
    with pytest.raises(StatsFileError, match="not a profiling checkpoint"):
        _run(model, data, plain)


def test_resume_without_a_checkpoint_starts_afresh_and_arguments_are_checked(tmp_path):
    model, data = _setup()
    ckpt = tmp_path / "new" / "ckpt.safetensors"
    fresh = _run(model, data, ckpt)
    _assert_bit_equal(fresh, profile(model, data, sites=SITES, progress=False))
    from safetensors import safe_open
    with safe_open(str(ckpt), framework="pt") as f:
        assert '"complete": true' in f.metadata()[CHECKPOINT_KEY]
    with pytest.raises(ValueError, match="needs checkpoint"):
        profile(model, data, resume=True, progress=False)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="checkpoint_every"):
            profile(model, data, checkpoint=ckpt, checkpoint_every=bad, progress=False)


if __name__ == "__main__":
    worker_model, worker_data = _setup()
    _kill_during_mlp_call(worker_model, call=int(sys.argv[2]))
    _run(worker_model, worker_data, Path(sys.argv[1]))
    sys.exit("the worker was meant to be killed before the end")
