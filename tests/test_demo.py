"""A reduced `manu-fast demo`: train (then reuse from cache), profile, select, prune, report; MANU beats random."""
import argparse
import json

from manu_fast import demo


def _args(tmp_path):
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    argv = ["--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--people", "12",
            "--train-steps", "150", "--methods", "manu-code", "random", "--alphas", "30",
            "--default-alpha", "30", "--rounds", "2", "--no-progress"]
    return parser.parse_args(argv)


def _gap(row):
    """forget drop minus retain drop, averaged over modalities (higher = more selective forgetting)."""
    d = row["drop"]
    return sum(d[f"forget/{m}"] - d[f"retain/{m}"] for m in ("multimodal", "text")) / 2


def test_reduced_demo_report_and_manu_beats_random(tmp_path, capsys):
    report = demo.main(_args(tmp_path))
    assert report["trained_now"]
    # the trained tiny LLaVA answers (nearly) everything before pruning, in both modalities
    assert all(v["accuracy"] >= 0.9 for v in report["baseline"].values()), report["baseline"]
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (tmp_path / "out" / "plot.png").stat().st_size > 1000
    assert set(on_disk) >= {"experiment", "baseline", "rows", "acceptance", "model", "num_questions"}
    assert {(r["method"], r["schedule"]) for r in on_disk["rows"]} == {
        (m, s) for m in ("manu-code", "random") for s in ("single-shot", "iterative")}
    for r in on_disk["rows"]:
        assert set(r["metrics"]) == {"forget/multimodal", "forget/text", "retain/multimodal", "retain/text"}
        assert r["pruned"] > 0
    for schedule in ("single-shot", "iterative"):
        manu = demo.default_row(on_disk, "manu-code", schedule)
        rand = demo.default_row(on_disk, "random", schedule)
        assert manu["pruned"] == rand["pruned"] and manu["pruned_by_tower"] == rand["pruned_by_tower"]
        assert _gap(manu) > _gap(rand) + 0.05, (schedule, manu["drop"], rand["drop"])
    assert "manu-code" in capsys.readouterr().out
    # a second run reuses the cached model
    cfg = demo.ModelConfig(num_people=12, train_steps=150)
    assert not demo.load_or_train(cfg, tmp_path / "cache", progress=False)[2]
