"""What a new user sees (issue 20): --help without torch in well under a second, --version and the start line
naming the backend, refusals that name both sides and the fix, hints that follow the data, evaluate --masks saying
what it applied, report --plot, a missing optional package as one install line, and MODEL as a hub id read offline
from a cache laid out as the hub's."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import bench_files as bf
from manu_fast import install, ops
from manu_fast.cli import main
from manu_fast.schema import StatsFileError, check_fingerprint

REPO = Path(__file__).resolve().parent.parent
HELP_COMMANDS = [[], ["profile"], ["select"], ["prune"], ["evaluate"], ["report"], ["demo"]]


def _run(*argv, env=None, timeout=120):
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=REPO, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_help_answers_fast_without_torch():
    code = ("import sys, time\n"
            "from manu_fast.cli import main\n"
            f"for argv in {HELP_COMMANDS!r}:\n"
            "    t = time.perf_counter()\n"
            "    try:\n"
            "        main(argv + ['--help'])\n"
            "    except SystemExit:\n"
            "        pass\n"
            "    print('TIME', ' '.join(argv) or '-', time.perf_counter() - t, file=sys.stderr)\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'help imported torch'\n")
    t = __import__("time").perf_counter()
    r = _run("-c", code)
    elapsed = __import__("time").perf_counter() - t
    assert r.returncode == 0, r.stderr
    times = {line.split()[1]: float(line.split()[2]) for line in r.stderr.splitlines() if line.startswith("TIME")}
    assert len(times) == len(HELP_COMMANDS) and max(times.values()) < 1.0, times
    assert elapsed < 3.0, f"python + every --help took {elapsed:.1f} s"  # generous: interpreter start included


def test_version_names_versions_and_backend_per_device(capsys):
    import torch
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert out.startswith("manu-fast 0.1.0") and f"torch {torch.__version__}" in out and "transformers " in out
    assert "triton " in out and "Triton interpreter" in out
    cpu = next(line for line in out.splitlines() if line.startswith("cpu:"))
    assert ("C++ kernel" in cpu) == ops.cpp_available()


def test_missing_extension_is_one_line_with_the_fix_for_this_install(monkeypatch):
    import torch
    monkeypatch.setattr(ops, "cpp_available", lambda: False)
    monkeypatch.delenv("MANU_FAST_BACKEND", raising=False)
    line = ops.describe_backend(torch.device("cpu"))
    assert line.startswith("PyTorch reference") and f"pip install -e {REPO}" in line and "\n" not in line
    monkeypatch.setattr(install, "source_checkout", lambda: None)  # installed into site-packages
    line = ops.describe_backend(torch.device("cpu"))
    assert "pip install -e" not in line and "--force-reinstall" in line and "pybind11" in line


def test_fingerprint_refusals_name_both_sides_and_the_fix():
    def fp(model_type, n_layers, neurons=40):
        return {"model_type": model_type, "layers": {f"model.layers.{i}.mlp": {
            "kind": "gated", "tower": "language", "neurons": neurons, "hidden": 16} for i in range(n_layers)}}
    cases = [(fp("llava", 2), fp("qwen2_vl", 2), "made for a 'qwen2_vl' model (2 language MLPs), this model is a "
                                                 "'llava' (2 language MLPs)"),
             (fp("llava", 2), fp("llava", 3), "the file has 3 language MLPs, this model 2 language MLPs; only in the "
                                              "file: 'model.layers.2.mlp'"),
             (fp("llava", 3), fp("llava", 2), "only in the model: 'model.layers.2.mlp'"),
             (fp("llava", 2, 48), fp("llava", 2), "layer 'model.layers.0.mlp' differs in neurons 40 in the file, 48 "
                                                  "in this model (and 1 more layer)")]
    for model, file, text in cases:
        with pytest.raises(StatsFileError) as e:
            check_fingerprint(model, file, "m.safetensors")
        message = str(e.value)
        assert message.startswith("m.safetensors: ") and text in message, message
        assert message.endswith("make it again from this model (manu-fast profile, then select)")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return bf.write_all(tmp_path_factory.mktemp("newcomer"))


def cli(capsys, *argv):
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def last_error(capsys, *argv) -> str:
    rc, _, err = cli(capsys, *argv)
    last = err.rstrip("\n").split("\n")[-1]
    assert rc == 2 and last.startswith("manu-fast: error: ") and "Traceback" not in err, err
    return last[len("manu-fast: error: "):]


def test_profile_select_plot_evaluate_with_masks(bench, tmp_path, capsys):
    stats, masks = tmp_path / "stats.safetensors", tmp_path / "masks.safetensors"
    clear = bench["clear"]
    rc, _, err = cli(capsys, "profile", bench["model"], stats, "--benchmark", "clear", "--forget",
                     clear["forget10+tofu"], "--retain", clear["retain90+tofu"], "--batch-size", 4, "--no-progress")
    assert rc == 0, err
    start = err.splitlines()[0]
    assert start.startswith("manu-fast profile: device cpu, dtype float32, backend: "), err
    assert "UserWarning" not in err
    assert cli(capsys, "select", stats, masks, "--alpha", 10)[0] == 0
    for source, picture in ((masks, tmp_path / "where.png"), (stats, tmp_path / "scores.png")):
        rc, out, err = cli(capsys, "report", source, "--plot", picture)
        assert rc == 0 and out.splitlines()[-1] == f"wrote {picture}", err
        assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 10_000
    assert "give a .png, .pdf or .svg" in last_error(capsys, "report", masks, "--plot", tmp_path / "where.txt")
    assert "not a model" in last_error(capsys, "report", bench["model"], "--plot", tmp_path / "m.png")
    mllmu = bench["mllmu"]
    rc, out, err = cli(capsys, "evaluate", bench["model"], "--forget", mllmu["forget_5"], "--retain",
                       mllmu["retain_95"], "--masks", masks, "--no-progress")
    assert rc == 0, err
    assert "manu-fast evaluate: device cpu, dtype float32, backend: " in err
    from manu_fast.masks import Masks
    m = Masks.load(masks)
    line = next(x for x in out.splitlines() if x.startswith("masks applied:"))
    assert line.startswith(f"masks applied: {masks} (strategy manu-code, alpha 10.0, site hidden): "
                           f"{m.num_pruned()} of {m.num_total()} neurons pruned (")
    for tower, (p, n) in m.by_tower().items():
        assert f"{tower} {p} of {n}" in line


def test_hints_follow_the_data(bench, tmp_path, capsys):
    clear, mllmu = bench["clear"], bench["mllmu"]
    out = tmp_path / "s.safetensors"
    assert last_error(capsys, "profile", bench["model"], out, "--forget", clear["forget10+tofu"], "--retain",
                      clear["retain90+tofu"]).endswith("are CLEAR's, not MLLMU-Bench's: pass --benchmark clear")
    assert last_error(capsys, "evaluate", bench["model"], "--forget", clear["forget10_perturbed"], "--retain",
                      clear["retain_perturbed"]).endswith("are CLEAR's, not MLLMU-Bench's: pass --protocol clear")
    message = last_error(capsys, "evaluate", bench["bare"], "--forget", mllmu["forget_5"], "--retain", mllmu["retain_95"])
    assert message == (f"{bench['bare']}: no usable processor saved with the model (missing the image processor "
                       "(processor_config.json or preprocessor_config.json), the tokenizer (tokenizer.json, "
                       "tokenizer.model or vocab.json), tokenizer_config.json); save the processor the model was "
                       "trained with next to its weights: AutoProcessor.from_pretrained(BASE_MODEL)"
                       f".save_pretrained('{bench['bare']}')")
    assert "--names is not needed" in last_error(capsys, "evaluate", bench["model"], "--forget", mllmu["forget_5"],
                                                 "--retain", mllmu["retain_95"], "--names", tmp_path / "n.json")
    assert last_error(capsys, "report", tmp_path / "nowhere").startswith("file not found")


def test_missing_optional_package_is_one_install_line(bench, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as after a plain `pip install .`
    mllmu = bench["mllmu"]
    assert last_error(capsys, "profile", bench["model"], tmp_path / "s.safetensors", "--forget", mllmu["manu_forget"],
                      "--retain", mllmu["retain_95"]) == ('reading MLLMU-Bench / CLEAR parquet files needs the pyarrow '
                                                          'package, which is not installed: pip install "manu-fast[eval]"')


def _hub_cache(cache: Path, repo: str, source: Path) -> Path:
    """A hub cache holding ``repo`` (files copied from ``source``) as huggingface_hub lays it out."""
    owner, name = repo.split("/")
    entry = cache / f"models--{owner}--{name}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    snapshot = entry / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in source.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    return snapshot


def test_model_may_be_a_hub_id_read_offline_from_the_cache(bench, tmp_path, capsys):
    cache = tmp_path / "hub"
    _hub_cache(cache, "someone/tiny-llava", bench["model"])
    stats, masks, pruned = tmp_path / "s.safetensors", tmp_path / "m.safetensors", tmp_path / "pruned"
    clear, mllmu = bench["clear"], bench["mllmu"]
    steps = [["profile", "someone/tiny-llava", stats, "--benchmark", "clear", "--forget", clear["forget10+tofu"],
              "--retain", clear["retain90+tofu"], "--no-progress"],
             ["select", stats, masks, "--alpha", 10],
             ["report", "someone/tiny-llava"],
             ["prune", "someone/tiny-llava", masks, pruned],
             ["evaluate", "someone/tiny-llava", "--forget", mllmu["forget_5"], "--retain", mllmu["retain_95"],
              "--no-progress"],
             ["report", "someone/not-cached"]]
    code = ("import sys\nfrom manu_fast.cli import main\n"
            f"for argv in {[[str(a) for a in s] for s in steps]!r}:\n"
            "    print('RC', main(argv), flush=True)\n")
    r = _run("-c", code, env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "home")},
             timeout=300)
    assert r.returncode == 0, r.stderr
    assert [line for line in r.stdout.splitlines() if line.startswith("RC")] == ["RC 0"] * 5 + ["RC 2"], r.stderr
    assert "model type 'llava'" in r.stdout and "classification" in r.stdout
    assert (pruned / "tokenizer_config.json").is_file() and (pruned / "config.json").is_file()
    assert r.stderr.rstrip().splitlines()[-1] == (
        f"manu-fast: error: model 'someone/not-cached': no such local folder, and as a hub model id not in the local "
        f"hub cache {cache} (HF_HUB_OFFLINE is set)")


def test_demo_plot_draws_every_method_beside_its_control(tmp_path):
    from manu_fast import demo

    def row(method, like, alpha, schedule, forget, retain):
        drop = {f"{s}/{m}": [d, 1.0] for s, d in (("forget", forget), ("retain", retain)) for m in ("multimodal", "text")}
        return {"method": method, "like": like, "alpha": alpha, "schedule": schedule, "drop": drop}
    rows = [row("manu-code", None, a, sch, a, a / 10) for a in (15.0, 30.0, 45.0) for sch in ("single-shot", "iterative")]
    rows += [row("random", "manu-code", a, "single-shot", 1.0, 1.0) for a in (15.0, 30.0, 45.0)]
    rows += [row("power-ratio", None, "calibrated", "single-shot", 40.0, 3.0),
             row("random", "power-ratio", "calibrated", "single-shot", 0.5, 1.0),
             row("manu-paper", None, 15.0, "single-shot", 0.0, 0.0)]
    path = tmp_path / "plot.png"
    demo.plot_report({"seeds": [0, 1], "rows": rows}, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000


def test_readme_layout_names_every_module():
    """The README's layout table lists every module of the package and nothing that is gone (merges added
    official.py, pipeline.py and backends/ without a row)."""
    import re
    text = (REPO / "README.md").read_text()
    table = text.split("## Layout", 1)[1].strip().split("\n\n", 1)[0]
    rows = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    named = set()
    for cell in rows:
        names = re.findall(r"`([^`]+)`", cell)
        folder = names[0].rsplit("/", 1)[0] + "/" if "/" in names[0].rstrip("/") else ""
        for n in names:
            n = n.split(" ")[0]
            named.add(n if "/" in n else folder + n)
    modules = {str(p.relative_to(REPO)) for p in (REPO / "manu_fast").rglob("*.py") if p.name != "__init__.py"}
    covered = {m for m in modules if m in named or any(m.startswith(n) for n in named if n.endswith("/"))}
    assert covered == modules, f"modules without a layout row: {sorted(modules - covered)}"
    missing = {n for n in named if n.startswith("manu_fast/") and not (REPO / n).exists()}
    assert not missing, f"layout rows naming no file: {sorted(missing)}"


def test_plot_labels_tell_a_layers_linears_apart():
    """A manu-official masks file holds each layer's Linears (``layer::pre``, ``::up``, ``::out``): their bars
    were all labelled with the layer's number."""
    from manu_fast.plots import layer_label
    assert layer_label("model.language_model.layers.12.mlp") == "12"
    assert layer_label("model.multi_modal_projector") == "multi_modal_projector"
    names = [f"model.language_model.layers.{i}.mlp::{s}" for i in (0, 1) for s in ("pre", "up", "out")]
    assert [layer_label(n) for n in names] == ["0 pre", "0 up", "0 out", "1 pre", "1 up", "1 out"]


def test_report_names_the_files_it_reads(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors", metadata={"format": "someone_else/1"})
    assert "not a manu_fast statistics, official statistics or masks file (format 'someone_else/1')" in last_error(
        capsys, "report", tmp_path / "other.safetensors")


def test_plot_of_statistics_without_the_hidden_site(bench, tmp_path, capsys):
    """A file profiled at --sites pre up has no 'hidden' blocks: report --plot drew nothing and failed with 'no
    statistics at site hidden for towers []'; it draws the first site the file has."""
    pytest.importorskip("matplotlib")
    files, stats = bench["mllmu"], tmp_path / "pre.safetensors"
    rc, _, err = cli(capsys, "profile", bench["model"], stats, "--forget", files["forget_5"], "--retain",
                     files["retain_95"], "--qa", files["ft_Data"], "--names", files["names"], "--sites", "pre", "up",
                     "--no-progress")
    assert rc == 0, err
    rc, out, err = cli(capsys, "report", stats, "--plot", tmp_path / "pre.png")
    assert rc == 0 and (tmp_path / "pre.png").stat().st_size > 0, err
