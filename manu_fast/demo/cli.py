"""The demo's command line (``manu-fast demo``, ``python -m manu_fast.demo``): options generated from RunConfig,
ModelConfig and ExperimentConfig; prints the table, writes report.json and plot.png."""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from .config import DEFAULT_METHOD, ExperimentConfig, ModelConfig, RunConfig
from .options import add_dataclass_arguments, from_args

EPILOG = ("Each seed trains its own world; the table is mean ± sd over seeds, report.json has every seed's rows. "
          "The strategies and the calibrated budgets: docs/SELECTION.md.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, RunConfig, "worlds")
    add_dataclass_arguments(parser, ModelConfig, "world shape and training")
    add_dataclass_arguments(parser, ExperimentConfig, "selection, pruning and calibration")


def main(args: argparse.Namespace) -> dict:
    """Run the demo from parsed ``add_arguments`` options; prints the table, writes report.json and plot.png."""
    from .experiment import check_experiment, check_run, run_worlds  # torch: only when the demo runs
    from .recipe import recipe_version
    from .summary import TARGETS, acceptance, format_acceptance, format_learning, format_table, plot_report, summarize
    t0 = time.perf_counter()
    run = from_args(RunConfig, args)
    model = from_args(ModelConfig, args)
    experiment = from_args(ExperimentConfig, args)
    check_run(run, model)
    check_experiment(experiment)  # bad options fail before any training
    model_options = {k: v for k, v in dataclasses.asdict(model).items() if k != "seed"}
    experiment_options = {k: v for k, v in dataclasses.asdict(experiment).items() if k != "seed"}
    reports = run_worlds(model_options, experiment_options, run)
    summary = summarize(reports)
    # judged against the targets: manu-code at the default fraction, and every calibrated method
    judged = ([(DEFAULT_METHOD, "fixed")] if DEFAULT_METHOD in experiment.methods else []) + \
        [(m, "calibrated") for m in experiment.calibrated]
    headlines = [acceptance(reports, m, kind) for m, kind in judged] if "random" in experiment.methods else []
    total = time.perf_counter() - t0
    out = Path(run.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"seeds": list(run.seeds), "summary": summary, "acceptance": headlines, "per_seed": reports,
              "recipe": recipe_version(), "run": dataclasses.asdict(run), "total_seconds": total, "device": "cpu",
              "trained_now": sum(r["trained_now"] for r in reports)}
    (out / "report.json").write_text(json.dumps(result, indent=1))
    plot_report(summary, out / "plot.png")
    print(format_table(summary))
    print("\nhow well each world was learned (the unpruned model; retrained with twice the steps below "
          f"{run.learned_line:g} %, up to {run.max_train_steps}):\n" + format_learning(reports))
    if headlines:
        print(f"\ntargets: forget drop >= {TARGETS['forget_mean']:g} points in both modalities (mean; min seed >= "
              f"{TARGETS['forget_min']:g}), retain drop <= {TARGETS['retain_mean']:g}, random control forget drop <= "
              f"{TARGETS['random_mean']:g}; drops in points, multimodal/text, mean over seeds")
        for a in headlines:
            print(format_acceptance(a))
    cached = sum(not r["trained_now"] for r in reports)
    print(f"\nreport: {out / 'report.json'}  plot: {out / 'plot.png'}  ({total:.0f} s; {result['trained_now']} "
          f"models trained now, {cached} world{'s' if cached != 1 else ''} from the cache)")
    return result


def parser() -> argparse.ArgumentParser:
    from . import __doc__ as doc
    p = argparse.ArgumentParser(prog="python -m manu_fast.demo", description=doc.splitlines()[0], epilog=EPILOG)
    add_arguments(p)
    return p
