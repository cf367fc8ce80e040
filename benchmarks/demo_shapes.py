"""The demo on worlds of other shapes: the multi-world table of the README (docs/DEMO.md).

    python benchmarks/demo_shapes.py --seeds 10 11 12 13 14          # runs every shape, then prints the table
    python benchmarks/demo_shapes.py --table-only                    # the table from the reports already there
    python benchmarks/demo_shapes.py --seeds 13 14 --out B --also A  # more seeds; the table over A's and B's seeds

Each shape is one ``manu-fast demo`` run (the same command with other world options, same selection settings,
the fixed fraction at the default alpha only) writing runs/shapes/<shape>/report.json; the table has, per shape
and method, the forget and retain drops (points, mean ± sd over the seeds; min seed) and, for the settings
that have a random control, the control's forget drop and the verdict against the targets.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from manu_fast import demo
from manu_fast.schema import MODALITIES, SPLITS, data_key

SHAPES = {"defaults": [], "forget 5 %": ["--forget-percent", "5"], "forget 20 %": ["--forget-percent", "20"],
          "80 people": ["--people", "80"], "LM MLP width 1024": ["--text-intermediate", "1024"]}
KEYS = {split: [data_key(split, m) for m in MODALITIES] for split in SPLITS}


def _folder(out: Path, shape: str) -> Path:
    return out / shape.replace(" ", "-").replace("%", "pct")


def _pair(drop: dict, split: str) -> str:
    return " / ".join(f"{drop[k][0]:.1f} ± {drop[k][1]:.1f}" for k in KEYS[split])


def _merged(folders: list[Path], shape: str) -> dict | None:
    """The shape's report over the seeds of every folder's run (each seed once), with its summary and verdicts
    computed again from the per-seed rows as ``manu-fast demo`` computes them."""
    reports = {}
    for folder in folders:
        path = _folder(folder, shape) / "report.json"
        if path.exists():
            for rep in json.loads(path.read_text())["per_seed"]:
                reports.setdefault(rep["seed"], rep)
    if not reports:
        return None
    reports = [reports[s] for s in sorted(reports)]
    exp = reports[0]["experiment"]
    judged = ([(demo.DEFAULT_METHOD, "fixed")] if demo.DEFAULT_METHOD in exp["methods"] else []) + \
        [(m, "calibrated") for m in exp["calibrated"]]
    acceptance = [demo.acceptance(reports, m, kind) for m, kind in judged] if "random" in exp["methods"] else []
    return {"seeds": [r["seed"] for r in reports], "per_seed": reports, "summary": demo.summarize(reports),
            "acceptance": acceptance}


def table(folders: list[Path], shapes) -> str:
    lines = ["| shape (seeds) | method | forget drop mm / txt (min seed) | retain drop mm / txt | random control "
             "forget drop | unpruned F / R accuracy | verdict |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for shape in shapes:
        result = _merged(folders, shape)
        if result is None:
            continue
        reports, summary = result["per_seed"], result["summary"]
        default_alpha = reports[0]["experiment"]["default_alpha"]
        verdicts = {(a["method"], a["kind"]): a for a in result["acceptance"]}
        base = summary["baseline"]["accuracy"]
        unpruned = " / ".join("/".join(f"{base[k][0]:.0f}" for k in KEYS[s]) for s in ("forget", "retain"))
        seeds = ",".join(map(str, result["seeds"]))
        for row in summary["rows"]:
            if row["like"] is not None or row["alpha"] not in (default_alpha, "calibrated"):
                continue
            kind = "calibrated" if row["alpha"] == "calibrated" else "fixed"
            per_seed = [next(r for r in rep["rows"] if r["method"] == row["method"] and r["like"] is None
                             and r["alpha"] == row["alpha"]) for rep in reports]
            low = "/".join(f"{min(r['drop'][k] for r in per_seed):.1f}" for k in KEYS["forget"])
            a = verdicts.get((row["method"], kind))
            control = ("-" if a is None else
                       " / ".join(f"{a['random_forget_drop'][m][0]:.1f}" for m in MODALITIES))
            verdict = "-" if a is None else demo.format_acceptance(a).split("\n")[0].rsplit("-> ", 1)[1]
            label = row["method"] + (f" {row['alpha']:g} %" if kind == "fixed" else " calibrated")
            lines.append(f"| {shape} ({seeds}) | {label} | {_pair(row['drop'], 'forget')} ({low}) | "
                         f"{_pair(row['drop'], 'retain')} | {control} | {unpruned} | {verdict} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", default=["10", "11", "12", "13", "14"])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--out", type=Path, default=Path("runs/shapes"))
    parser.add_argument("--jobs", default=None, help="as manu-fast demo --jobs")
    parser.add_argument("--max-train-steps", default=None, help="as manu-fast demo --max-train-steps")
    parser.add_argument("--also", type=Path, nargs="*", default=[],
                        help="folders of earlier runs (other seeds) whose worlds the table includes")
    parser.add_argument("--table-only", action="store_true", help="only print the table of the reports there")
    args = parser.parse_args()
    if not args.table_only:
        demo_parser = demo.parser()
        for shape in args.shapes:
            argv = ["--seeds", *args.seeds, "--alphas", "30", "--default-alpha", "30", "--no-progress",
                    "--out", str(_folder(args.out, shape)), *SHAPES[shape]]
            for name in ("jobs", "max_train_steps"):
                if getattr(args, name):
                    argv += ["--" + name.replace("_", "-"), getattr(args, name)]
            print(f"== {shape}: manu-fast demo {' '.join(argv)}", flush=True)
            demo.main(demo_parser.parse_args(argv))
    print(table([args.out, *args.also], args.shapes))


if __name__ == "__main__":
    main()
