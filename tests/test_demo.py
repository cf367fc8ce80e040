"""`manu-fast demo`: a reduced run from a clean cache reproduces pinned figures; the cached model gives the same
ones; several worlds in parallel processes equal the serial run; the multi-seed summary and targets."""
import argparse
import dataclasses
import json

import pytest

from manu_fast import demo

KEYS = ("forget/multimodal", "forget/text", "retain/multimodal", "retain/text")
REDUCED = ["--people", "12", "--train-steps", "150", "--methods", "manu-code", "power-ratio", "random", "--calibrated", "power-ratio",
           "--alphas", "30", "--default-alpha", "30", "--no-progress"]
# What the reduced demo (seed 0) prints from a clean cache, on every x86-64 CPU (AVX2 or AVX512: the worlds train
# under fixed numerics, recipe.NUMERIC_ENV): correct answers per (split/modality) out of 12 forget and 132 retain
# questions, and the SHA-256 of the trained weights. Pinned with torch 2.13.0+cpu and transformers 5.24.0
# on an Intel Xeon (AVX512), and the same under ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2.
# Another torch version trains other weights: the pin then fails, saying which versions it was made with.
PINNED_VERSIONS = {"torch": "2.13.0+cpu", "transformers": "5.24.0"}
PINNED_WEIGHTS = "7561a3d44f22140c15c53dcb619e52beaf9d2924404b9cdd6aa3d0fde00df6af"
PINNED_CORRECT = {  # (method, like, alpha): correct answers in KEYS order
    ("manu-code", None, 30.0): (5, 4, 132, 131),
    ("random", "manu-code", 30.0): (12, 12, 132, 132),
    ("power-ratio", None, 30.0): (6, 5, 132, 131),
    ("power-ratio", None, "calibrated"): (7, 4, 132, 128),
    ("random", "power-ratio", "calibrated"): (12, 12, 132, 132),
}
PINNED_BUDGET = {"model.language_model.layers.0.mlp": 10.0, "model.language_model.layers.1.mlp": 50.0}


def _args(*argv):
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def _correct(report: dict) -> dict:
    rows = report["per_seed"][0]["rows"]
    return {(r["method"], r["like"], r["alpha"]): tuple(round(r["metrics"][k]["accuracy"] * r["metrics"][k]["n"])
                                                       for k in KEYS) for r in rows}


def test_reduced_demo_reproduces_pinned_figures_and_from_cache(tmp_path, capsys):
    first = demo.main(_args("--out", tmp_path / "out", "--cache-dir", tmp_path / "cache", "--seeds", 0, *REDUCED))
    assert first["trained_now"] == 1
    world = first["per_seed"][0]
    assert all(v["accuracy"] >= 0.9 for v in world["baseline"].values()), world["baseline"]
    assert world["learning"]["learned"] and world["learning"]["attempts"][0]["train_steps"] == 150
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (tmp_path / "out" / "plot.png").stat().st_size > 1000
    assert set(on_disk) >= {"summary", "acceptance", "per_seed", "recipe", "seeds"}
    assert set(_correct(on_disk)) == set(PINNED_CORRECT)
    calibrated = next(r for r in world["rows"] if r["alpha"] == "calibrated" and r["like"] is None)
    control = next(r for r in world["rows"] if r["alpha"] == "calibrated" and r["like"] == "power-ratio")
    assert calibrated["pruned_by_tower"] == control["pruned_by_tower"]  # the control prunes the same counts
    out = capsys.readouterr().out
    assert "power-ratio (calibrated budgets)" in out and "manu-code (alpha default" in out

    # again from the cache: the same model and the same figures
    second = demo.main(_args("--out", tmp_path / "again", "--cache-dir", tmp_path / "cache", "--seeds", 0, *REDUCED))
    assert second["trained_now"] == 0
    assert second["per_seed"][0]["weights_sha256"] == world["weights_sha256"]
    assert [r["metrics"] for r in second["per_seed"][0]["rows"]] == [r["metrics"] for r in world["rows"]]

    versions = {k: first["recipe"][k] for k in PINNED_VERSIONS}
    assert versions == PINNED_VERSIONS, f"the figures are pinned for {PINNED_VERSIONS}; update them for {versions}"
    assert world["weights_sha256"] == PINNED_WEIGHTS
    assert _correct(first) == PINNED_CORRECT
    assert calibrated["budget"]["alpha"] == PINNED_BUDGET


@pytest.mark.slow
def test_parallel_worlds_equal_serial(tmp_path):
    model = {"num_people": 6, "train_steps": 20}
    experiment = {"methods": ("manu-code", "power-ratio", "random"), "alphas": (30.0,), "default_alpha": 30.0,
                  "forget_percent": 15, "later_layer_budgets": (40.0,), "image_budgets": (0.0,)}
    run = demo.RunConfig(seeds=(3, 4), cache_dir=str(tmp_path / "cache"), no_progress=True, learned_line=0)
    parallel = demo.run_worlds(model, experiment, dataclasses.replace(run, jobs=2))
    serial = demo.run_worlds(model, experiment, dataclasses.replace(run, jobs=1))
    assert [r["seed"] for r in parallel] == [3, 4] and all(r["trained_now"] for r in parallel)
    assert not any(r["trained_now"] for r in serial)  # the workers filled the cache
    for p, s in zip(parallel, serial):
        assert p["weights_sha256"] == s["weights_sha256"]
        assert [r["metrics"] for r in p["rows"]] == [r["metrics"] for r in s["rows"]]
    assert parallel[0]["weights_sha256"] != parallel[1]["weights_sha256"]  # two worlds, two models
    with pytest.raises(ValueError, match="distinct"):
        demo.run_worlds(model, experiment, dataclasses.replace(run, seeds=(1, 1)))


@pytest.mark.parametrize("cpu", [{"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}])
def test_weights_do_not_depend_on_the_cpu_kernels(tmp_path, monkeypatch, cpu):
    """A world started from a caller that asks for other CPU kernels (as an AVX2 machine would pick them) trains the
    same weights: the worker's numerics are fixed (recipe.NUMERIC_ENV), not inherited."""
    model = {"num_people": 4, "train_steps": 8}
    experiment = {"methods": ("manu-code",), "alphas": (30.0,), "default_alpha": 30.0, "calibrated": ()}
    run = demo.RunConfig(seeds=(0,), no_progress=True, learned_line=0)
    here = demo.run_worlds(model, experiment, dataclasses.replace(run, cache_dir=str(tmp_path / "a")))
    for name, value in cpu.items():
        monkeypatch.setenv(name, value)
    emulated = demo.run_worlds(model, experiment, dataclasses.replace(run, cache_dir=str(tmp_path / "b")))
    assert here[0]["trained_now"] and emulated[0]["trained_now"]
    assert here[0]["weights_sha256"] == emulated[0]["weights_sha256"]
    with pytest.raises(RuntimeError, match="started with"):  # this process imported torch with its own kernels
        with demo.fixed_numerics():
            pass


def _report(seed, drops, control_drops, learned=True):
    """A one-world report with the two headline rows (drops in points) and their random controls."""
    def row(method, like, alpha, drop):
        metrics = {k: {"accuracy": 1 - d / 100, "answer_prob": 0.5, "n": 100} for k, d in zip(KEYS, drop)}
        out = {"method": method, "like": like, "alpha": alpha, "schedule": "single-shot", "pruned": 10,
               "metrics": metrics, "drop": dict(zip(KEYS, drop))}
        if alpha == "calibrated" and like is None:
            out["budget"] = {"alpha": {"language": 10.0}, "validation_drop": dict(zip(KEYS, drop))}
        return out
    baseline = {k: {"accuracy": 1.0, "answer_prob": 0.9, "n": 100} for k in KEYS}
    attempt = {"train_steps": 400, "final_loss": 0.01, "trained_now": True,
               "profiling_accuracy": {k: 100.0 if learned else 50.0 for k in KEYS}}
    return {"seed": seed, "baseline": baseline, "experiment": {"default_alpha": 30.0},
            "learning": {"learned": learned, "line": 90.0, "attempts": [attempt]},
            "rows": [row("manu-code", None, 30.0, drops), row("random", "manu-code", 30.0, control_drops),
                     row("power-ratio", None, "calibrated", drops), row("random", "power-ratio", "calibrated",
                                                                        control_drops)]}


def test_summary_mean_sd_and_targets():
    reports = [_report(0, (40, 30, 2, 4), (0, 1, 0, 0)), _report(1, (20, 36, 4, 2), (2, 5, 0, 0))]
    summary = demo.summarize(reports)
    row = next(r for r in summary["rows"] if r["method"] == "manu-code")
    assert row["drop"]["forget/multimodal"] == pytest.approx([30.0, 200 ** 0.5])  # sample sd of 40, 20
    assert row["accuracy"]["forget/text"] == pytest.approx([67.0, 18 ** 0.5])
    assert summary["baseline"]["accuracy"]["retain/text"] == [100.0, 0.0]
    a = demo.acceptance(reports, "manu-code", "fixed")
    assert a["forget_drop"]["multimodal"][0] == 30 and a["forget_drop_min"] == {"multimodal": 20, "text": 30}
    assert a["random_forget_drop"]["text"][0] == 3 and a["passed"]
    failing = [_report(0, (40, 30, 2, 4), (0, 1, 0, 0)), _report(1, (20, 36, 4, 2), (2, 5.5, 0, 0))]
    assert not demo.acceptance(failing, "manu-code", "fixed")["passed"]  # random control moved forget 3.25 > 3
    one_low = [_report(0, (46, 30, 2, 4), (0, 0, 0, 0)), _report(1, (14, 36, 4, 2), (0, 0, 0, 0))]
    calibrated = demo.acceptance(one_low, "power-ratio", "calibrated")
    assert not calibrated["passed"]  # a seed below 15
    assert calibrated["validation_drop"]["forget/multimodal"][0] == 30  # what the budgets were chosen on
    assert "chosen on the profiling questions" in demo.format_acceptance(calibrated)
    with pytest.raises(ValueError, match="missing from some seeds"):
        demo.summarize([reports[0], {**reports[1], "rows": reports[1]["rows"][:2]}])
    assert "±" in demo.format_table(summary) and "PASS" in demo.format_acceptance(a)
    # a world that was not learned is flagged and its run not judged, however good its drops
    unlearned = [reports[0], _report(1, (20, 36, 4, 2), (2, 5, 0, 0), learned=False)]
    verdict = demo.acceptance(unlearned, "manu-code", "fixed")
    assert not verdict["passed"] and verdict["not_learned"] == [1]
    assert "not judged (seeds 1 not learned)" in demo.format_acceptance(verdict)
    assert "NOT LEARNED" in demo.format_learning(unlearned).splitlines()[1]


def test_budget_candidates_and_bad_options():
    fingerprint = {"layers": {"v.0": {"tower": "vision"}, "p": {"tower": "projector"},
                              "lm.layers.0.mlp": {"tower": "language"}, "lm.layers.1.mlp": {"tower": "language"},
                              "lm.layers.10.mlp": {"tower": "language"}}}
    exp = demo.ExperimentConfig(first_layer_budgets=(0.0, 5.0), later_layer_budgets=(40.0,), image_budgets=(0.0, 10.0))
    cands = demo.budget_candidates(fingerprint, exp)
    assert cands[0] == {"lm.layers.1.mlp": 40.0, "lm.layers.10.mlp": 40.0}  # natural order: layer 0 is the first
    assert cands[-1] == {"lm.layers.0.mlp": 5.0, "lm.layers.1.mlp": 40.0, "lm.layers.10.mlp": 40.0,
                         "vision": 10.0, "projector": 10.0}
    assert len(cands) == 4
    with pytest.raises(ValueError, match="calibrated methods"):
        demo.check_experiment(demo.ExperimentConfig(methods=("manu-code", "random")))
    with pytest.raises(ValueError, match="default_alpha"):
        demo.check_experiment(demo.ExperimentConfig(alphas=(15.0,)))


def test_options_are_generated_from_the_config_fields():
    """Every option field of the three configs is one option whose default is the field's; parsing nothing gives
    the default configs back, and world-shape options reach ModelConfig / ExperimentConfig."""
    args = _args()
    for cls in (demo.RunConfig, demo.ModelConfig, demo.ExperimentConfig):
        assert demo.cli.from_args(cls, args) == cls()
    args = _args("--people", 80, "--text-intermediate", 1024, "--forget-percent", 20, "--seeds", 5, 6, "--rounds", 3)
    assert demo.cli.from_args(demo.ModelConfig, args) == demo.ModelConfig(num_people=80, text_intermediate=1024)
    assert demo.cli.from_args(demo.ExperimentConfig, args).forget_percent == 20.0
    assert demo.cli.from_args(demo.ExperimentConfig, args).iterative_rounds == 3
    assert demo.cli.from_args(demo.RunConfig, args).seeds == (5, 6)
    with pytest.raises(ValueError, match="distinct"):
        demo.check_run(demo.RunConfig(seeds=(1, 1)), demo.ModelConfig())
    with pytest.raises(ValueError, match="forget_percent"):
        demo.check_experiment(demo.ExperimentConfig(forget_percent=100))


def test_budget_rule_holds_each_modality_to_the_line():
    from manu_fast.pipeline import choose_budget

    def tried(name, pruned, forget, retain):
        return {"name": name, "pruned": pruned, "drop": dict(zip(KEYS, (*forget, *retain)))}
    lopsided = tried("lopsided", 10, (60, 20), (1, 1))  # the larger sum, but text barely forgotten
    even = tried("even", 10, (35, 32), (3, 3))
    costly = tried("costly", 5, (70, 70), (6, 1))  # retain-multimodal over the limit (the mean would pass)
    best, met = choose_budget([lopsided, even, costly], retain_limit=4)
    assert best["name"] == "even" and met
    assert choose_budget([even, tried("smaller", 4, (35, 32), (3, 3))], 4)[0]["name"] == "smaller"  # tie: fewer
    best, met = choose_budget([costly, tried("worse", 1, (1, 1), (7, 7))], retain_limit=4)
    assert best["name"] == "costly" and not met  # none under the limit: the smallest worst retain drop
