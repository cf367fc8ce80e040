"""Hostile input and misuse, class by class (issue 18; every case is a row of docs/ROBUSTNESS.md):

- the CLI path-trick table: no command writes over one of its inputs or into a folder it reads (links included);
- expected failures are one line and exit 2, internal errors keep their traceback; stale temp files are cleaned;
- a fuzzer over every metadata field of every file kind (statistics, masks, checkpoint, benchmark parquet): a
  hostile value with a valid checksum is a StatsFileError / DataError naming it, or a file that loads and works;
- compaction always changes the layout identity and masks are translated across it, never misapplied;
- resume with other weights, dtype or batches is refused; nested / concurrent profilers are refused;
- bad data is refused at the door of ``profile``.
"""
import copy
import json
import os
import threading

import pytest
import torch

import bench_files as bf
import tiny_models as tm
from manu_fast.cli import main
from manu_fast.datasets import DataError, load_mllmu_profiles, load_mllmu_split, read_rows
from manu_fast.digests import weights_digest
from manu_fast.io import CHECKSUM_KEY, load_tensors, save_tensors
from manu_fast.masks import Masks, apply_masks, compact_model, translate_masks
from manu_fast.profiler import CHECKPOINT_KEY, Profiler, load_checkpoint, profile, run_identity
from manu_fast.schema import FIELDS
from manu_fast.stats import NeuronStats, StatsFileError

LAYER = "model.layers.0.mlp"


def _data(model, n=2, batch=2, seed=0):
    return {(split, "text"): [tm.inputs("llama", model, batch=batch, text_len=8, seed=seed + 10 * i + len(split))
                              for i in range(n)] for split in ("forget", "retain")}


@pytest.fixture(scope="module")
def llama():
    return tm.build("llama")


@pytest.fixture(scope="module")
def stats(llama):
    return profile(llama, _data(llama), progress=False)


def _cli(capsys, *argv):
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- path tricks
@pytest.fixture()
def files(tmp_path, stats):
    """A fake model folder (paths are refused before any model is read), a statistics and a masks file."""
    model = tmp_path / "M"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    stats.save(tmp_path / "s.safetensors")
    Masks.all_kept(stats.fingerprint).save(tmp_path / "k.safetensors")
    (tmp_path / "F.parquet").write_bytes(b"forget")
    (tmp_path / "R.parquet").write_bytes(b"retain")
    os.symlink(tmp_path / "s.safetensors", tmp_path / "link.safetensors")
    os.link(tmp_path / "s.safetensors", tmp_path / "hard.safetensors")
    os.symlink(model, tmp_path / "Mlink")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "pruned").mkdir()
    os.replace(tmp_path / "k.safetensors", tmp_path / "pruned" / "k.safetensors")
    return tmp_path


PROFILE = ["profile", "{M}", "{out}", "--synthetic"]
EVALUATE = ["evaluate", "{M}", "--forget", "{F}", "--retain", "{R}"]
PATH_TRICKS = [  # (argv, what the one-line error says)
    (["select", "{s}", "{s}"], "OUT {s} is the STATS it reads"),
    (["select", "{s}", "{link}"], "is the STATS it reads"),
    (["select", "{s}", "{hard}"], "is the STATS it reads"),
    (["select", "{link}", "{d}/sub/../s.safetensors"], "is the STATS it reads"),
    (["select", "{s}", "{d}"], "is a folder, not a file path"),
    (["select", "{s}", "{d}/a_file/m.safetensors"], "cannot create the folder of OUT"),
    (["profile", "{M}", "{M}/model.safetensors", "--synthetic"], "lies inside the MODEL_DIR folder"),
    (["profile", "{M}", "{Mlink}/new.safetensors", "--synthetic"], "lies inside the MODEL_DIR folder"),
    (PROFILE + ["--checkpoint", "{M}/model.safetensors"], "--checkpoint {M}/model.safetensors lies inside the MODEL_DIR"),
    (PROFILE + ["--checkpoint", "{d}/out.safetensors"], "OUT and --checkpoint are the same path"),
    (["profile", "{M}", "{F}", "--forget", "{F}", "--retain", "{R}"], "is the --forget it reads"),
    (["profile", "{M}", "{d}/o.safetensors", "--forget", "{F}", "--retain", "{R}", "--checkpoint", "{R}"],
     "--checkpoint {R} is the --retain it reads"),
    (["prune", "{M}", "{d}/pruned/k.safetensors", "{M}"], "OUT_DIR {M} is the MODEL_DIR it reads"),
    (["prune", "{M}", "{d}/pruned/k.safetensors", "{Mlink}"], "is the MODEL_DIR it reads"),
    (["prune", "{M}", "{d}/pruned/k.safetensors", "{M}/sub"], "lies inside the MODEL_DIR folder"),
    (["prune", "{M}", "{d}/pruned/k.safetensors", "{d}/pruned"], "the MASKS {d}/pruned/k.safetensors lies inside"),
    (["prune", "{M}", "{d}/pruned/k.safetensors", "{d}"], "the MODEL_DIR {M} lies inside the output folder"),
    (EVALUATE + ["--json", "{F}"], "--json {F} is the --forget it reads"),
    (EVALUATE + ["--json", "{M}/r.json"], "lies inside the MODEL_DIR folder"),
    (EVALUATE + ["--masks", "{d}/pruned/k.safetensors", "--json", "{d}/pruned/k.safetensors"], "is the --masks it reads"),
    (EVALUATE + ["--json", "{d}/a_file/r.json"], "cannot create the folder of --json"),
    (["demo", "--out", "{d}/run", "--cache-dir", "{d}/run"], "--out and --cache-dir are the same path"),
]


@pytest.mark.parametrize("argv,message", PATH_TRICKS, ids=[" ".join(a[:1] + a[2:]) for a, _ in PATH_TRICKS])
def test_cli_refuses_outputs_over_its_inputs(files, capsys, argv, message):
    names = {"d": files, "M": files / "M", "Mlink": files / "Mlink", "s": files / "s.safetensors",
             "link": files / "link.safetensors", "hard": files / "hard.safetensors", "F": files / "F.parquet",
             "R": files / "R.parquet", "out": files / "out.safetensors"}
    before = {p: p.read_bytes() for p in files.rglob("*") if p.is_file()}
    rc, err = _cli(capsys, *[a.format(**names) for a in argv])
    assert rc == 2 and err.count("\n") == 1 and err.startswith("manu-fast: error: "), err
    assert message.format(**names) in err, err
    assert {p: p.read_bytes() for p in files.rglob("*") if p.is_file()} == before  # nothing written, nothing lost
    assert not (files / "run").exists() and not (files / "M" / "sub").exists()


def test_output_folders_are_created_before_the_work(files, capsys):
    rc, err = _cli(capsys, "select", files / "s.safetensors", files / "new" / "deep" / "m.safetensors")
    assert rc == 0 and Masks.load(files / "new" / "deep" / "m.safetensors").keep, err


# ---------------------------------------------------------------------------------------------------- expected failures
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device,message", [("cuda", "has no CUDA device"), ("cuda:3", "has no CUDA device"),
                                            ("bogus", "is not a torch device")])
def test_missing_device_is_one_line_before_the_model_loads(files, capsys, device, message):
    rc, err = _cli(capsys, "prune", files / "M", files / "pruned" / "k.safetensors", files / "out", "--device", device)
    assert rc == 2 and message in err and err.count("\n") == 1, err


def test_full_disk_is_one_line_and_leaves_no_temp_file(files, capsys, monkeypatch):
    from safetensors import SafetensorError
    import manu_fast.io as mio

    def full(*args, **kwargs):
        raise SafetensorError("No space left on device (os error 28)")
    monkeypatch.setattr(mio, "save_file", full)
    rc, err = _cli(capsys, "select", files / "s.safetensors", files / "m.safetensors")
    assert rc == 2 and err.startswith("manu-fast: error: cannot write") and "No space left" in err, err
    assert not list(files.glob("m.safetensors*"))


def _expected_failures():
    import PIL.Image
    import torch.distributed
    from safetensors import SafetensorError
    from manu_fast.distributed import DistributedError
    from manu_fast.profiler import NonFiniteActivationError
    return [SafetensorError("No space left on device"), PIL.Image.DecompressionBombError("bomb"),
            torch.OutOfMemoryError("CUDA out of memory"), torch.distributed.DistError("timed out"),
            DistributedError("profiling failed on rank(s) [1]"), NonFiniteActivationError("80 non-finite values"),
            MemoryError("no memory"), ImportError("No module named 'rouge_score'"), OSError(28, "No space left"),
            StatsFileError("bad file\nsecond line")]


@pytest.mark.parametrize("error", _expected_failures(), ids=lambda e: type(e).__name__)
def test_expected_failures_are_one_line_and_exit_2(files, capsys, monkeypatch, error):
    import manu_fast.select as sel

    def fail(*args, **kwargs):
        raise error
    monkeypatch.setattr(sel, "select_neurons", fail)
    rc, err = _cli(capsys, "select", files / "s.safetensors", files / "m.safetensors")
    assert rc == 2 and err.count("\n") == 1 and err.startswith("manu-fast: error: ") and "Traceback" not in err, err


def test_internal_errors_keep_their_traceback(files, capsys, monkeypatch):
    import manu_fast.select as sel

    def bug(*args, **kwargs):
        raise KeyError("a bug")
    monkeypatch.setattr(sel, "select_neurons", bug)
    rc, err = _cli(capsys, "select", files / "s.safetensors", files / "m.safetensors")
    assert rc == 1 and "Traceback" in err and "KeyError: 'a bug'" in err and "please report it" in err


def test_a_stale_temp_file_of_a_killed_write_is_removed_by_the_next(stats, tmp_path):
    stale = tmp_path / "s.safetensors.k1ll3d.tmp"
    stale.write_bytes(b"half a file")
    other = tmp_path / "t.safetensors.k1ll3d.tmp"  # another file's: left alone
    other.write_bytes(b"x")
    stats.save(tmp_path / "s.safetensors")
    assert not stale.exists() and other.exists()


def _bomb_png(side: int = 20_000) -> bytes:
    """A valid 1-bit PNG of side x side pixels (400 M) that compresses to a few kB: a decompression bomb."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = zlib.compress(b"\x00" * ((1 + side // 8) * side), 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def test_decompression_bomb_is_a_data_error(tmp_path):
    rows = [{"image": _bomb_png(), "ID": "1", "name": "Ana",
             "metadata": json.dumps([{"Question": "Where?", "Answer": "Lima"}])}]
    items = load_mllmu_profiles(bf.write(tmp_path / "p.parquet", rows))
    with pytest.raises(DataError, match="row 0 image: cannot decode the image.*decompression bomb"):
        items[0].image.load()


def test_ctrl_c_is_one_line_and_exit_130(files, capsys, monkeypatch):
    import manu_fast.select as sel

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(sel, "select_neurons", interrupted)
    rc, err = _cli(capsys, "select", files / "s.safetensors", files / "m.safetensors")
    assert rc == 130 and err == "manu-fast: interrupted\n"


# ---------------------------------------------------------------------------------------------------- file fuzzer
DEEP = "[" * 100_000 + "]" * 100_000
HOSTILE = ["", "null", "5", "-1", '"x"', "[]", "{}", "true", "1e400", "NaN", "-Infinity", DEEP,
           '{"a": ' * 129 + "1" + "}" * 129, "[" + ",".join(['"a/b/c"'] * 5000) + "]", "{not json"]
LEAVES = [None, -1, 0, 2**63, 1.5, True, "x", "", "a/b", [], {}, [1], {"a": 1}]


def _mutations(value, path=()):
    """(path, new value) for every leaf and container of a JSON value: each leaf replaced by every LEAVES value, each
    key deleted."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield path + (k,), _DELETE
            yield from _mutations(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value[:3]):
            yield from _mutations(v, path + (i,))
    for leaf in LEAVES:
        yield path, leaf


_DELETE = object()


def _set_path(value, path, new):
    value = copy.deepcopy(value)
    if not path:
        return new
    target = value
    for key in path[:-1]:
        target = target[key]
    if new is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = new
    return value


def _variants(meta: dict, json_fields: tuple[str, ...], text_fields: tuple[str, ...]):
    """Every metadata dict with one field made hostile."""
    for field in (*json_fields, *text_fields):
        for raw in HOSTILE:
            yield field, {**meta, field: raw}
        yield field, {k: v for k, v in meta.items() if k != field}
    for field in json_fields:
        for path, new in _mutations(json.loads(meta[field])):
            yield f"{field}{list(path)}", {**meta, field: json.dumps(_set_path(json.loads(meta[field]), path, new))}


def _fuzz(path, tensors, meta, json_fields, text_fields, use) -> int:
    """Write each variant with a valid checksum and ``use`` it: a StatsFileError or success, nothing else."""
    tried = 0
    for field, variant in _variants(meta, json_fields, text_fields):
        variant.pop(CHECKSUM_KEY, None)
        save_tensors(tensors, path, variant)
        try:
            use(path)
        except StatsFileError:
            pass
        except Exception as e:  # noqa: BLE001 - the point of the test
            raise AssertionError(f"field {field}: {type(e).__name__}: {e}") from e
        tried += 1
    return tried


def _file(path, what, fmt):
    tensors, meta = load_tensors(path, fmt, what)
    return tensors, meta


def test_fuzz_every_field_of_a_statistics_file(stats, tmp_path):
    from manu_fast.cli import format_stats
    from manu_fast.select import select_neurons
    stats.save(tmp_path / "s.safetensors")
    tensors, meta = _file(tmp_path / "s.safetensors", "statistics", "manu_fast.stats/1")

    def use(p):
        s = NeuronStats.load(p)
        format_stats(s)
        try:
            select_neurons(s, "manu-code", 10)
        except ValueError:  # a loadable file may still not suit a strategy: a clear ValueError is fine
            pass
    assert _fuzz(tmp_path / "f.safetensors", tensors, meta, ("groups", "fingerprint"), ("tau", "format"), use) > 250


def test_fuzz_every_field_of_a_masks_file(stats, tmp_path):
    from manu_fast.cli import format_masks
    masks = Masks.all_kept(stats.fingerprint)
    masks.description = {"strategy": "manu-code", "alpha": 2.0, "previous": {"strategy": "random"}}
    masks.save(tmp_path / "m.safetensors")
    tensors, meta = _file(tmp_path / "m.safetensors", "masks", "manu_fast.masks/1")
    assert _fuzz(tmp_path / "f.safetensors", tensors, meta, ("fingerprint", "description"), ("site", "format"),
                 lambda p: format_masks(Masks.load(p))) > 300


def test_fuzz_every_field_of_a_checkpoint(llama, tmp_path):
    data = _data(llama)
    ck = tmp_path / "ck.safetensors"
    profile(llama, data, checkpoint=ck, progress=False)
    tensors, meta = _file(ck, "statistics", "manu_fast.stats/1")
    target = NeuronStats.load(ck)

    def use(p):
        load_checkpoint(p, target, run=run_identity(llama))
    assert _fuzz(tmp_path / "f.safetensors", tensors, meta, (CHECKPOINT_KEY,), (), use) > 100


def _tensor_variants(tensors: dict):
    """Every tensor dict with one tensor of another dtype or shape, deleted, or one unknown tensor added."""
    for key, t in tensors.items():
        for dtype in (torch.float32, torch.float16, torch.bool, torch.int64, torch.uint8):
            if t.dtype != dtype:
                yield f"{key} as {dtype}", {**tensors, key: t.to(dtype)}
        yield f"{key} shorter", {**tensors, key: t[..., :-1].contiguous()}
        yield f"{key} flat" if t.dim() > 1 else f"{key} 2-D", {**tensors, key: t.reshape(1, -1) if t.dim() == 1
                                                               else t.reshape(-1).contiguous()}
        yield f"{key} empty", {**tensors, key: t[..., :0].contiguous()}
        yield f"{key} deleted", {k: v for k, v in tensors.items() if k != key}
    some = next(iter(tensors.values()))
    for extra in ("model.layers.9.mlp::hidden", "model.layers.0.mlp::bogus", "model.layers.0.mlp", "model.layers.9.mlp",
                  "", "::"):
        if extra not in tensors:
            yield f"extra {extra!r}", {**tensors, extra: some.clone()}


@pytest.mark.parametrize("kind", ["statistics", "masks"])
def test_fuzz_every_tensor_of_a_file(stats, tmp_path, kind):
    path = tmp_path / "f.safetensors"
    if kind == "statistics":
        stats.save(path)
        fmt, use = "manu_fast.stats/1", NeuronStats.load
    else:
        Masks.all_kept(stats.fingerprint).save(path)
        fmt, use = "manu_fast.masks/1", Masks.load
    tensors, meta = load_tensors(path, fmt, kind)
    meta.pop(CHECKSUM_KEY)
    tried = 0
    for what, variant in _tensor_variants(tensors):
        save_tensors(variant, path, meta)
        try:
            loaded = use(path)
        except StatsFileError:
            tried += 1
            continue
        except Exception as e:  # noqa: BLE001 - the point of the test
            raise AssertionError(f"{what}: {type(e).__name__}: {e}") from e
        assert what.endswith("deleted"), what  # only a missing block / layer mask is a valid file (fewer layers)
        assert len(getattr(loaded, "blocks", getattr(loaded, "keep", None))) == len(tensors) - 1
        tried += 1
    assert tried > 20


@pytest.mark.parametrize("field", ["count", "m2", "sum_abs", "sum_sq", "active", "nonfinite", "mean"])
@pytest.mark.parametrize("value", [float("inf"), float("nan"), -1.0])
def test_impossible_moments_are_refused_naming_the_field(stats, tmp_path, field, value):
    bad = NeuronStats(stats.groups, stats.fingerprint, stats.tau, {k: v.clone() for k, v in stats.blocks.items()})
    key = next(iter(bad.blocks))
    bad.blocks[key][FIELDS.index(field), 0, 3] = value
    bad.save(tmp_path / "s.safetensors")
    if field == "mean" and value == -1.0:  # a negative mean is a mean
        NeuronStats.load(tmp_path / "s.safetensors")
        return
    with pytest.raises(StatsFileError, match=f"block {key!r} field {field!r} holds"):
        NeuronStats.load(tmp_path / "s.safetensors")


@pytest.mark.parametrize("field,value,message", [("count", 2.5, "field 'count' holds non-integer counts"),
                                                 ("nonfinite", 0.5, "field 'nonfinite' holds non-integer"),
                                                 ("active", 1e9, "field 'active' exceeds 'count'")])
def test_impossible_counts_are_refused(stats, tmp_path, field, value, message):
    bad = NeuronStats(stats.groups, stats.fingerprint, stats.tau, {k: v.clone() for k, v in stats.blocks.items()})
    bad.blocks[next(iter(bad.blocks))][FIELDS.index(field), 0, 3] = value
    bad.save(tmp_path / "s.safetensors")
    with pytest.raises(StatsFileError, match=message):
        NeuronStats.load(tmp_path / "s.safetensors")


def test_fuzz_benchmark_parquet_fields(tmp_path):
    root = tmp_path / "mllmu"
    root.mkdir()
    files = bf.write_mllmu(root)
    rows = [dict(r.values) for r in read_rows(files["forget_5"])]
    columns = ("Classification_Task", "Generation_Task", "Mask_Task")
    base = [{**r, **{c: json.dumps(r[c]) for c in columns}} for r in rows]
    tried = 0
    for column in (*columns, "ID", "biography"):
        for raw in HOSTILE:
            bad = copy.deepcopy(base)
            bad[0][column] = raw
            try:
                load_mllmu_split(bf.write(tmp_path / "bad.parquet", bad))
            except DataError:
                pass
            tried += 1
    meta = json.dumps([{"Question": "Where?", "Answer": "Lima"}])
    for raw in (*HOSTILE, meta):
        row = {"image": bf.png((1, 2, 3)), "ID": "1", "name": "Ana", "metadata": raw}
        try:
            load_mllmu_profiles(bf.write(tmp_path / "p.parquet", [row]))
        except DataError:
            pass
        tried += 1
    assert tried > 80


# ---------------------------------------------------------------------------------------------------- compaction
def test_compaction_always_changes_the_layout_and_masks_are_translated(tmp_path):
    from manu_fast.adapters import fingerprint
    model = tm.build("llama")  # 40 neurons: pruning 2 rounds back up to 40 (the width does not change)
    x = tm.inputs("llama", model)
    full_fp = fingerprint(model)
    first = Masks.all_kept(full_fp)
    for k in first.keep.values():
        k[[5, 8, 14]] = False
    apply_masks(model, first)
    compact_model(model)
    compact_fp = fingerprint(model)
    assert compact_fp != full_fp and compact_fp["layers"][LAYER]["neurons"] == 40
    second = Masks.all_kept(full_fp)  # a selection in the original numbering
    for k in second.keep.values():
        k[[20, 21]] = False
    with pytest.raises(StatsFileError, match="made for the full model, this model is compacted"):
        apply_masks(model, second)
    with torch.no_grad():
        reference = tm.build("llama")
        apply_masks(reference, first & second)
        expected = reference(**x).logits
        translated = translate_masks(second, model)
        apply_masks(model, translated, "second")
        torch.testing.assert_close(model(**x).logits, expected, rtol=1e-5, atol=1e-5)
    back = translate_masks(translated, model)  # and back into the original numbering: dropped neurons stay pruned
    assert back.fingerprint == full_fp and back.pruned_indices(LAYER).tolist() == [5, 8, 14, 20, 21]
    stats = profile(model, _data(model), progress=False)  # statistics of the compacted model fit only it
    with pytest.raises(StatsFileError, match="made for a compacted model, this model is not compacted"):
        NeuronStats.load(_saved(stats, tmp_path), expect_fingerprint=full_fp)


def _saved(stats, tmp_path):
    stats.save(tmp_path / "c.safetensors")
    return tmp_path / "c.safetensors"


# ---------------------------------------------------------------------------------------------------- resume / merge
def test_resume_refuses_other_weights_dtype_or_batches(tmp_path):
    model = tm.build("llama")
    data = _data(model, n=3)
    ck = tmp_path / "ck.safetensors"
    profile(model, data, checkpoint=ck, checkpoint_every=1, progress=False)
    other = tm.build("llama", seed=1)  # same architecture, other weights
    with pytest.raises(StatsFileError, match="other weights"):
        profile(other, data, checkpoint=ck, resume=True, progress=False)
    with pytest.raises(StatsFileError, match="weights in float32, this model's are in float64"):
        profile(tm.build("llama").double(), data, checkpoint=ck, resume=True, progress=False)
    rebatched = {key: [{k: t[i:i + 1] for k, t in b.items()} for b in v for i in range(2)]
                 for key, v in data.items()}  # the same rows in batches of one (another --batch-size)
    with pytest.raises(StatsFileError, match="the first 3 batches of forget/text differ"):
        profile(model, rebatched, checkpoint=ck, resume=True, progress=False)
    changed = {key: [dict(b) for b in v] for key, v in data.items()}
    changed["forget", "text"][1]["input_ids"] = changed["forget", "text"][1]["input_ids"].flip(0)
    with pytest.raises(StatsFileError, match="differ from those the checkpoint holds"):
        profile(model, changed, checkpoint=ck, resume=True, progress=False)
    profile(model, data, checkpoint=ck, resume=True, progress=False)  # the same run resumes


def test_weights_digest_sees_a_changed_row_and_is_cheap():
    import time
    model = tm.build("llama")
    before = weights_digest(model)
    with torch.no_grad():
        model.get_submodule(f"{LAYER}.up_proj").weight[7] += 1
    assert weights_digest(model) != before
    big = torch.nn.Linear(8192, 8192, bias=False)  # 67M parameters: digest in milliseconds
    start = time.perf_counter()
    weights_digest(big)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("groups", [[], "forget/text/text", ["forget/text"], ["a/b/c", "a/b/c"], ["a//c"], [5]])
def test_profiler_group_labels_are_checked(llama, groups):
    with pytest.raises(ValueError, match="groups must be|group labels must be"):
        Profiler(llama, groups)


def test_nested_and_concurrent_profilers_are_refused(llama):
    groups = ["forget/text/text"]
    with Profiler(llama, groups):
        with pytest.raises(RuntimeError, match="already being profiled"):
            with Profiler(llama, groups):
                pass
        with pytest.raises(RuntimeError, match="already being profiled"):
            profile(llama, _data(llama), progress=False)
    errors = []
    entered, release = threading.Event(), threading.Event()

    def first():
        with Profiler(llama, groups):
            entered.set()
            release.wait(10)

    t = threading.Thread(target=first)
    t.start()
    entered.wait(10)
    try:
        profile(llama, _data(llama), progress=False)
    except RuntimeError as e:
        errors.append(str(e))
    release.set()
    t.join()
    assert errors and "already being profiled" in errors[0]
    profile(llama, _data(llama), progress=False)  # free again once they are done


# ---------------------------------------------------------------------------------------------------- bad data
@pytest.mark.parametrize("data,message", [
    (None, "data must be a dict"),
    ([], "data must be a dict"),
    ({}, "no data to profile"),
    ({"forget": []}, "must be a (split, modality) pair"),
    ({("for/get", "text"): []}, "cannot contain '/'"),
    ({("forget", "text"): None}, "must be an iterable of batches"),
    ({("forget", "text"): "batches"}, "must be an iterable of batches"),
    ({("forget", "text"): [[1, 2, 3]]}, "batch 1 of forget/text is a list, not a dict"),
    ({("forget", "text"): [{"input_ids": torch.zeros(0, 5, dtype=torch.long)}]}, "input 'input_ids' is empty"),
    ({("forget", "text"): [{"input_ids": torch.zeros(2, 5, dtype=torch.long, device="meta")}]}, "'meta' device"),
    ({("forget", "text"): [{"input_ids": torch.zeros(2, 5)}]}, "input_ids must hold integer token ids, not torch.float32"),
    ({("forget", "text"): [{"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 4)}]},
     "attention_mask has shape (2, 4), input_ids (2, 5)"),
])
def test_bad_data_is_refused_at_the_door(llama, data, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        profile(llama, data, progress=False)


@pytest.fixture(scope="module")
def mllmu(tmp_path_factory):
    root = tmp_path_factory.mktemp("mllmu")
    return bf.write_mllmu(root)


def test_overlapping_forget_and_retain_people_are_refused_unless_allowed(files, mllmu, capsys):
    same = ["profile", files / "M", files / "o.safetensors", "--forget", mllmu["manu_forget"], "--retain",
            mllmu["manu_forget"], "--names", mllmu["names"]]
    rc, err = _cli(capsys, *same)
    assert rc == 2 and "people are in both --forget and --retain (IDs" in err and err.count("\n") == 1, err
    rc, err = _cli(capsys, *same, "--allow-overlap")  # goes on, to the (fake) model folder's processor
    assert rc == 2 and "people are in both" not in err and str(files / "M") in err and err.count("\n") == 1, err


def test_test_set_as_profiling_data_is_warned_about(files, mllmu, capsys):
    rc, err = _cli(capsys, "profile", files / "M", files / "o.safetensors", "--forget", mllmu["Test_Set"],
                   "--retain", mllmu["retain_95"], "--qa", mllmu["ft_Data"], "--names", mllmu["names"])
    assert "warning: --forget" in err and "looks like MLLMU-Bench's Test_Set" in err, err


def test_a_model_with_an_infinite_weight_is_still_patched(monkeypatch):
    import manu_fast.adapters as ad
    monkeypatch.setattr(ad, "_PROBE_VERDICTS", {})  # the first patch of the class in this process
    model = tm.build("llama")
    with torch.no_grad():
        for name in ("model.layers.0.mlp", "model.layers.1.mlp"):
            model.get_submodule(f"{name}.down_proj").weight[0] = float("inf")  # +inf - inf: NaN outputs
    patch = ad.patch_model(model)
    assert not any(layer.part for layer in patch.layers.values())  # fused, as without the inf


def test_wrong_types_in_the_api_are_named():
    from manu_fast.masks import prune_weights
    from manu_fast.select import select_neurons
    model = tm.build("llama")
    for call, message in [(lambda: profile(None, {}), "model must be a torch.nn.Module"),
                          (lambda: profile("model", {}), "model must be a torch.nn.Module"),
                          (lambda: select_neurons(None), "stats must be a manu_fast.stats.NeuronStats"),
                          (lambda: select_neurons({"a": 1}), "stats must be a manu_fast.stats.NeuronStats"),
                          (lambda: apply_masks(model, {"x": 1}), "masks must be a manu_fast.masks.Masks"),
                          (lambda: prune_weights(model, "masks.safetensors"), "masks must be a manu_fast.masks.Masks"),
                          (lambda: Masks({}, "fp"), "fingerprint must be a model fingerprint"),
                          (lambda: Masks({}, {"model_type": "llama"}), "fingerprint must be a model fingerprint"),
                          (lambda: Masks([], {"layers": {}}), "keep must be a dict")]:
        with pytest.raises(TypeError, match=message):
            call()


@pytest.mark.parametrize("config", ["[1]", "{not json", '{"bogus": 1}', "[" * 100_000])
def test_a_damaged_demo_config_is_one_line_before_the_model_loads(files, capsys, config):
    (files / "M" / "manu_fast_demo.json").write_text(config)
    rc, err = _cli(capsys, "profile", files / "M", files / "o.safetensors", "--synthetic")
    assert rc == 2 and "manu_fast_demo.json: not a configuration written by `manu-fast demo`" in err, err
