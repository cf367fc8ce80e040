"""Hostile and bad input: every failure mode gives a clear error (or a counted, warned exclusion) and loses
nothing. Each test is a row of docs/ROBUSTNESS.md."""
import math
import pickle
import re
import warnings
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tiny_models as tm
from manu_fast.adapters import UnsupportedModelError, fingerprint, get_patch
from manu_fast.masks import Masks, apply_masks
from manu_fast.profiler import NonFiniteActivationError, profile
from manu_fast.select import select_neurons
from manu_fast.stats import FIELD_INDEX, NeuronStats, StatsFileError

ROOT = Path(__file__).resolve().parent.parent
LAYER0 = "model.layers.0.mlp"


@pytest.fixture(scope="module")
def llama():
    model = tm.build("llama")
    data = {("forget", "text"): [tm.inputs("llama", model, seed=s) for s in (1, 2)],
            ("retain", "text"): [tm.inputs("llama", model, seed=s) for s in (3, 4)]}
    return model, data, profile(model, data, progress=False)


# ---- empty data, empty modalities ----

def test_empty_data_or_split_is_refused(llama):
    model, data, _ = llama
    with pytest.raises(ValueError, match="no data to profile"):
        profile(model, {}, progress=False)
    with pytest.raises(ValueError, match="the retain/text data yielded no batch"):
        profile(model, {**data, ("retain", "text"): []}, progress=False)
    with pytest.raises(ValueError, match="the forget/text data yielded no batch"):
        profile(model, {("forget", "text"): iter(())}, progress=False)


def test_selection_without_a_retain_split_is_refused(llama):
    model, data, _ = llama
    forget_only = profile(model, {("forget", "text"): data[("forget", "text")]}, progress=False)
    with pytest.raises(ValueError, match="no group retain/text"):
        select_neurons(forget_only, "manu-code", 2.0)


def test_a_modality_with_zero_tokens_warns_and_selection_refuses_it(llama):
    model, data, _ = llama
    masked_out = [dict(b, profile_mask=torch.zeros_like(b["input_ids"], dtype=torch.bool)) for b in data[("retain", "text")]]
    with pytest.warns(UserWarning, match="no token of retain/text was profiled"):
        stats = profile(model, {("forget", "text"): data[("forget", "text")], ("retain", "text"): masked_out}, progress=False)
    assert stats.block(LAYER0)[FIELD_INDEX["count"], stats.groups.index("retain/text/text")].sum() == 0
    with pytest.raises(ValueError, match="retain/text/.* is empty"):
        select_neurons(stats, "manu-code", 2.0)  # not NaN scores turned into masks


# ---- NaN / Inf activations ----

def _poison_gate_input(model, value: float, call: int):
    """Put ``value`` into the gate_proj input of layer 0 at token (0, 0) of the ``call``-th forward; returns the hook.
    Only that gate is poisoned, so layer 0's other tokens are untouched (later layers see it spread by attention)."""
    calls = [0]

    def hook(module, args):
        calls[0] += 1
        if calls[0] == call:
            x = args[0].clone()
            x[0, 0] = value
            return (x,)
        return None

    return model.get_submodule(f"{LAYER0}.gate_proj").register_forward_pre_hook(hook)


def test_nonfinite_activations_are_excluded_counted_and_warned(llama):
    model, data, _ = llama
    first = data[("forget", "text")][:1]
    handle = _poison_gate_input(model, float("nan"), call=1)
    try:
        with pytest.warns(UserWarning, match="non-finite activation values"):
            poisoned = profile(model, {("forget", "text"): first}, progress=False)
    finally:
        handle.remove()
    # the same statistics as profiling without that token, plus one non-finite value per neuron
    pm = first[0]["attention_mask"].bool().clone()
    pm[0, 0] = False
    clean = profile(model, {("forget", "text"): [dict(first[0], profile_mask=pm)]}, progress=False)
    got, want = poisoned.block(LAYER0), clean.block(LAYER0)
    g = poisoned.groups.index("forget/text/text")
    assert (got[FIELD_INDEX["nonfinite"], g] == 1).all() and (want[FIELD_INDEX["nonfinite"]] == 0).all()
    fields = [FIELD_INDEX[f] for f in ("count", "mean", "m2", "sum_abs", "sum_sq", "active")]
    torch.testing.assert_close(got[fields], want[fields], rtol=1e-12, atol=1e-12)


def test_nonfinite_error_stops_at_the_batch_and_the_checkpoint_loses_nothing(llama, tmp_path):
    model, data, reference = llama
    ckpt = tmp_path / "ckpt.safetensors"
    handle = _poison_gate_input(model, float("inf"), call=3)  # the first retain batch
    try:
        with pytest.raises(NonFiniteActivationError, match=r"model\.layers\.0\.mlp::hidden at batch 1 of retain/text; "
                           r"the checkpoint .* holds 2 batches of forget/text: fix the cause and resume"):
            profile(model, data, checkpoint=ckpt, checkpoint_every=1, on_nonfinite="error", progress=False)
    finally:
        handle.remove()
    # the checkpoint holds the two clean forget batches; fixing the input and resuming gives the clean result
    resumed = profile(model, data, checkpoint=ckpt, resume=True, on_nonfinite="error", progress=False)
    for key, block in reference.blocks.items():
        assert torch.equal(resumed.blocks[key], block), key


# ---- selection and masks ----

@pytest.mark.parametrize("alpha", [0, 100, -1, 150, math.nan, math.inf])
def test_alpha_out_of_range_is_refused(llama, alpha):
    with pytest.raises(ValueError, match=r"alpha is a percentage in \(0, 100\)"):
        select_neurons(llama[2], "manu-code", alpha)


def test_masks_of_wrong_length_or_for_another_model_are_refused(llama, tmp_path):
    model, _, stats = llama
    fp = stats.fingerprint
    n = fp["layers"][LAYER0]["neurons"]
    with pytest.raises(ValueError, match=rf"must be bool of shape \({n},\)"):
        Masks({LAYER0: torch.ones(n + 1, dtype=torch.bool)}, fp)
    with pytest.raises(ValueError, match="which the model fingerprint does not have"):
        Masks({"model.layers.9.mlp": torch.ones(n, dtype=torch.bool)}, fp)
    with pytest.raises(ValueError, match=rf"this layer has {n} neurons"):
        get_patch(model).layers[LAYER0].set_mask("bad", torch.ones(n - 1, dtype=torch.bool))
    masks = select_neurons(stats, "manu-code", 10.0)
    other = tm.build("qwen2")
    with pytest.raises(StatsFileError, match=r"made for a 'llama' model \(.*\), this model is a 'qwen2' .*: make it again from this model"):
        apply_masks(other, masks)
    wider = tf.LlamaForCausalLM(tf.LlamaConfig(**{**tm._llama_text(), "intermediate_size": 48}))
    masks.save(tmp_path / "m.safetensors")
    with pytest.raises(StatsFileError, match=f"layer '{LAYER0}' differs in neurons {n} in the file, 48 in this model"):
        Masks.load(tmp_path / "m.safetensors", expect_fingerprint=fingerprint(wider))
    with pytest.raises(StatsFileError, match="in the file, .* in this model"):
        apply_masks(wider, masks)


# ---- damaged, tampered, foreign and missing files ----

def _data_offset(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")  # safetensors: u64 header length, header, data


def test_truncated_tampered_and_foreign_files_are_refused(llama, tmp_path):
    _, _, stats = llama
    good = tmp_path / "stats.safetensors"
    stats.save(good)
    raw = good.read_bytes()
    masks_path = tmp_path / "masks.safetensors"
    select_neurons(stats, "manu-code", 10.0).save(masks_path)

    cases = {
        "truncated": (raw[: len(raw) // 2], "not a readable safetensors"),
        "empty": (b"", "not a readable safetensors"),
        "garbage": (b"\x00" * 64, "not a readable safetensors"),
    }
    flipped = bytearray(raw)
    flipped[_data_offset(good) + 100] ^= 0x01  # one bit of one float64 statistic
    cases["data bit flipped"] = (bytes(flipped), "does not match its SHA-256 checksum")
    header = raw[8:_data_offset(good)]
    assert b'"tau":"0.1"' in header
    edited = header.replace(b'"tau":"0.1"', b'"tau":"0.2"')  # a plausible value: only the checksum can tell
    cases["metadata edited"] = (raw[:8] + edited + raw[_data_offset(good):], "checksum")
    for name, (content, message) in cases.items():
        bad = tmp_path / f"{name.replace(' ', '_')}.safetensors"
        bad.write_bytes(content)
        with pytest.raises(StatsFileError, match=message):
            NeuronStats.load(bad)

    # a valid safetensors file with the right format and no checksum entry: refused, not loaded unverified
    with safe_open(str(good), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "sha256"}
    save_file(load_file(str(good)), str(tmp_path / "no_checksum.safetensors"), metadata=meta)
    with pytest.raises(StatsFileError, match="no checksum"):
        NeuronStats.load(tmp_path / "no_checksum.safetensors")

    with pytest.raises(StatsFileError, match="not a manu_fast statistics file"):
        NeuronStats.load(masks_path)
    with pytest.raises(StatsFileError, match="not a manu_fast masks file"):
        Masks.load(good)
    mraw = bytearray(masks_path.read_bytes())
    mraw[-1] ^= 0x01
    masks_path.write_bytes(bytes(mraw))
    with pytest.raises(StatsFileError, match="checksum"):
        Masks.load(masks_path)


class _Exploit:
    """A pickle that creates a marker file when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_pickle_disguised_as_a_stats_file_is_refused_unread(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps(_Exploit(marker)))
    for loader in (NeuronStats.load, Masks.load):
        with pytest.raises(StatsFileError, match="not a readable safetensors"):
            loader(evil)
    assert not marker.exists()


def test_missing_paths_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="statistics file not found"):
        NeuronStats.load(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="masks file not found"):
        Masks.load(tmp_path / "nope.safetensors")


def test_no_pickle_on_any_load_path():
    """Files are read with safetensors only: no pickle import, no torch.load without weights_only=True,
    no numpy allow_pickle, anywhere in the package or the kernels."""
    offenders = []
    for path in sorted([*(ROOT / "manu_fast").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]):
        text = path.read_text()
        if re.search(r"^\s*(import|from)\s+(pickle|dill|cloudpickle|joblib)\b", text, re.M):
            offenders.append(f"{path.name}: imports a pickle module")
        for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in call.group(1):
                offenders.append(f"{path.name}: torch.load without weights_only=True")
        if "allow_pickle=True" in text:
            offenders.append(f"{path.name}: numpy allow_pickle=True")
    assert not offenders, offenders


# ---- unsupported models and bad arguments ----

def test_unsupported_models_are_refused_with_the_fix(llama):
    _, data, _ = llama
    with pytest.raises(UnsupportedModelError, match="has no config.model_type"):
        profile(torch.nn.Linear(4, 4), data, progress=False)
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=tm.VOCAB))
    with pytest.raises(UnsupportedModelError, match=r"'gpt2' is not in manu_fast.adapters.MODEL_TABLE.*register_model"):
        profile(gpt2, data, progress=False)


def test_bad_profile_arguments_are_refused(llama):
    model, data, _ = llama
    with pytest.raises(ValueError, match="unknown sites"):
        profile(model, data, sites=("bogus",), progress=False)
    with pytest.raises(ValueError, match="tau must be a finite non-negative"):
        profile(model, data, tau=-1.0, progress=False)
    with pytest.raises(ValueError, match="on_nonfinite must be one of"):
        profile(model, data, on_nonfinite="ignore", progress=False)
    batch = dict(data[("forget", "text")][0], profile_mask=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="profile_mask has shape"):
        profile(model, {("forget", "text"): [batch]}, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean run warns about nothing
        profile(model, data, progress=False)


def test_a_model_left_on_the_meta_device_is_refused(llama):
    _, data, _ = llama
    with torch.device("meta"):
        empty_model = tf.LlamaForCausalLM(tf.LlamaConfig(**tm._llama_text()))
    with pytest.raises(ValueError, match="weights are on the 'meta' device with no accelerate hook"):
        profile(empty_model, data, progress=False)


def test_distributed_outside_torchrun_is_refused(llama, monkeypatch):
    model, data, _ = llama
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match="distributed profiling needs torch.distributed: launch with torchrun"):
        profile(model, data, distributed=True, progress=False)
