"""Over the worlds of a run: mean ± sd of every row, the targets of the headline settings, how well each world
was learned, the terminal table and the plot."""
from __future__ import annotations

import statistics
from pathlib import Path

from ..schema import MODALITIES, SPLITS, data_key
from .config import DEFAULT_SCHEDULE, EXPERIMENTAL, OFFICIAL


def _row_key(row: dict) -> tuple:
    return row["method"], row["like"], row["alpha"], row["schedule"]


def _mean_sd(values) -> list[float]:
    values = list(values)
    return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0]


def summarize(reports: list[dict]) -> dict:
    """Mean and sample standard deviation over the worlds of every row (accuracy, answer probability, drop, pruned
    count) and of the unpruned baseline; rows keyed by (method, like, alpha, schedule)."""
    keys = list(reports[0]["baseline"])
    by_key = {}
    for rep in reports:
        for row in rep["rows"]:
            by_key.setdefault(_row_key(row), []).append(row)
    rows = []
    for key, group in by_key.items():
        if len(group) != len(reports):
            raise ValueError(f"row {key} is missing from some seeds' reports")
        rows.append({"method": key[0], "like": key[1], "alpha": key[2], "schedule": key[3], "n": len(group),
                     "pruned": _mean_sd(r["pruned"] for r in group),
                     "accuracy": {k: _mean_sd(100 * r["metrics"][k]["accuracy"] for r in group) for k in keys},
                     "answer_prob": {k: _mean_sd(r["metrics"][k]["answer_prob"] for r in group) for k in keys},
                     "drop": {k: _mean_sd(r["drop"][k] for r in group) for k in keys}})
    baseline = {"accuracy": {k: _mean_sd(100 * rep["baseline"][k]["accuracy"] for rep in reports) for k in keys},
                "answer_prob": {k: _mean_sd(rep["baseline"][k]["answer_prob"] for rep in reports) for k in keys}}
    return {"seeds": [rep["seed"] for rep in reports], "baseline": baseline, "rows": rows}


def headline_rows(reports: list[dict], method: str, kind: str) -> tuple[list[dict], list[dict]]:
    """Per seed, the row of a headline setting (``kind`` "fixed": the default alpha and schedule; "calibrated") and
    the row of its random control."""
    alpha = "calibrated" if kind == "calibrated" else reports[0]["experiment"]["default_alpha"]
    schedule = "single-shot" if kind == "calibrated" else DEFAULT_SCHEDULE
    found = []
    for rep in reports:
        index = {_row_key(r): r for r in rep["rows"]}
        try:
            found.append((index[method, None, alpha, schedule], index["random", method, alpha, schedule]))
        except KeyError:
            raise KeyError(f"seed {rep['seed']} has no {method} {kind} row with its random control") from None
    return [f[0] for f in found], [f[1] for f in found]


# the line a headline setting must reach (README): forget falls >= 30 points in both modalities on average, no seed
# below 15, retain falls <= 5, the random control of the same counts moves forget <= 3 on average
TARGETS = {"forget_mean": 30.0, "forget_min": 15.0, "retain_mean": 5.0, "random_mean": 3.0}


def acceptance(reports: list[dict], method: str, kind: str) -> dict:
    """The targets (TARGETS) for one headline setting over the worlds, with the numbers they were judged on. A run
    with a world that was not learned (see ``learning``) is not judged: ``passed`` is False, ``not_learned`` lists it."""
    rows, controls = headline_rows(reports, method, kind)
    out = {"method": method, "kind": kind, "seeds": [rep["seed"] for rep in reports],
           "not_learned": [rep["seed"] for rep in reports if not rep["learning"]["learned"]]}
    for name, source, split in (("forget_drop", rows, "forget"), ("retain_drop", rows, "retain"),
                                ("random_forget_drop", controls, "forget")):
        out[name] = {m: _mean_sd(r["drop"][f"{split}/{m}"] for r in source) for m in MODALITIES}
    out["forget_drop_min"] = {m: min(r["drop"][f"forget/{m}"] for r in rows) for m in MODALITIES}
    if kind == "calibrated":  # what the budget was chosen on: the drops on the profiling questions
        out["validation_drop"] = {k: _mean_sd(r["budget"]["validation_drop"][k] for r in rows)
                                  for k in rows[0]["budget"]["validation_drop"]}
    out["passed"] = (not out["not_learned"]
                     and all(out["forget_drop"][m][0] >= TARGETS["forget_mean"] for m in MODALITIES)
                     and all(out["forget_drop_min"][m] >= TARGETS["forget_min"] for m in MODALITIES)
                     and all(out["retain_drop"][m][0] <= TARGETS["retain_mean"] for m in MODALITIES)
                     and all(out["random_forget_drop"][m][0] <= TARGETS["random_mean"] for m in MODALITIES))
    return out


def format_acceptance(a: dict) -> str:
    def pair(d):
        return "/".join(f"{d[m][0]:.1f}" for m in MODALITIES)
    what = f"{a['method']} ({'calibrated budgets' if a['kind'] == 'calibrated' else 'alpha default, ' + DEFAULT_SCHEDULE})"
    return (f"{what}: forget drop {pair(a['forget_drop'])} (min seed "
            + "/".join(f"{a['forget_drop_min'][m]:.1f}" for m in MODALITIES) + f"), retain drop {pair(a['retain_drop'])}, "
            f"random control forget drop {pair(a['random_forget_drop'])} -> {_verdict(a)}"
            + ("" if "validation_drop" not in a else "\n    chosen on the profiling questions, where it dropped forget "
               + "/".join(f"{a['validation_drop'][f'forget/{m}'][0]:.1f}" for m in MODALITIES) + ", retain "
               + "/".join(f"{a['validation_drop'][f'retain/{m}'][0]:.1f}" for m in MODALITIES)))


def _verdict(a: dict) -> str:
    if a["not_learned"]:
        return f"not judged (seeds {', '.join(map(str, a['not_learned']))} not learned)"
    return "PASS" if a["passed"] else "not met"


def format_learning(reports: list[dict]) -> str:
    """One line per world: its training (steps, final loss) and unpruned profiling accuracy against the line."""
    short = {"forget/multimodal": "F-mm", "forget/text": "F-txt", "retain/multimodal": "R-mm", "retain/text": "R-txt"}
    lines = []
    for rep in reports:
        learning = rep["learning"]
        last = learning["attempts"][-1]
        acc = " ".join(f"{short[k]} {v:5.1f}" for k, v in last["profiling_accuracy"].items())
        steps = " -> ".join(str(a["train_steps"]) for a in learning["attempts"])
        verdict = "learned" if learning["learned"] else f"NOT LEARNED (below {learning['line']:g} %): not judged"
        lines.append(f"seed {rep['seed']}: {steps} steps, final loss {last['final_loss']:.3f}; unpruned accuracy "
                     f"on the profiling questions {acc} -> {verdict}")
    return "\n".join(lines)


def _label(row: dict) -> str:
    name = row["method"] + ("*" if row["method"] in EXPERIMENTAL else "")
    return f"random like {row['like']}" if row["like"] else name


def _alpha_label(alpha) -> str:
    return alpha if isinstance(alpha, str) else f"{alpha:g}"


def format_table(summary: dict) -> str:
    keys = [data_key(s, m) for s in SPLITS for m in MODALITIES]
    short = {"forget/multimodal": "F-mm", "forget/text": "F-txt", "retain/multimodal": "R-mm", "retain/text": "R-txt"}
    width = max([24] + [len(_label(r)) for r in summary["rows"]])
    head = f"{'method':<{width}} {'alpha%':>10} {'schedule':<11} {'pruned':>6} " + " ".join(f"{short[k]:>11}" for k in keys)
    lines = [head, "-" * len(head)]

    def cells(acc):
        return " ".join(f"{acc[k][0]:5.1f} ±{acc[k][1]:4.1f}" for k in keys)

    lines.append(f"{'unpruned':<{width}} {'-':>10} {'-':<11} {0:>6} {cells(summary['baseline']['accuracy'])}")
    for r in summary["rows"]:
        lines.append(f"{_label(r):<{width}} {_alpha_label(r['alpha']):>10} {r['schedule']:<11} {r['pruned'][0]:>6.0f} "
                     f"{cells(r['accuracy'])}")
    n = len(summary["seeds"])
    lines.append(f"accuracy in %, mean ± sd over {n} seed{'s' if n > 1 else ''} ({', '.join(map(str, summary['seeds']))});"
                 " F = forget, R = retain; mm = image + question, txt = name + question")
    official = any(r["method"] in OFFICIAL for r in summary["rows"])
    lines.append("alpha% = share of the language model's neurons (image towers: --image-tower-ratio of it"
                 + ("; manu-official: of each tower's Linear rows, the official prune_percent" if official else "")
                 + "); calibrated = per-layer budgets chosen on the profiling questions")
    lines.append("random like X = the neuron counts of X in every layer, chosen uniformly; * experimental, see "
                 "docs/SELECTION.md")
    return "\n".join(lines)


def plot_report(summary: dict, path: Path) -> None:
    """The demo's picture (``manu_fast.plots.plot_demo``): drops per method and modality, the targets shaded, each
    method beside its random control."""
    from ..plots import plot_demo
    plot_demo(summary, path, TARGETS, EXPERIMENTAL)
