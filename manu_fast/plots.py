"""Pictures, drawn with matplotlib (the ``eval`` extra): where the neurons are (``manu-fast report FILE --plot
OUT.png``), and the demo's results (``plot_demo``).

``report --plot``:

- a masks file: the share of each layer's neurons that the masks prune, one panel per tower (vision, projector,
  language model), layers in model order, the count written over each bar;
- a statistics file: per layer, the distribution over its neurons of the forget/retain ratio of the RMS activation
  (log10; 0 = the neuron is as active on forget as on retain data), multimodal and text-only data side by side
  (the box: quartiles, whiskers: 5th-95th percentile, dot: the most forget-specific neuron). The neurons far above
  0 are the ones every strategy of docs/SELECTION.md ranks first.
"""
from __future__ import annotations

import re
from pathlib import Path

from .install import require
from .schema import MODALITIES, SITES, SPLITS, in_tower_order

MODALITY_COLOURS = {"multimodal": "tab:blue", "text": "tab:orange"}
TOWER_COLOURS = {"vision": "tab:green", "projector": "tab:purple", "language": "tab:red"}


def layer_label(name: str) -> str:
    """A short axis label for a layer: its last index (``...layers.12.mlp`` -> ``12``), else its last name part;
    a Linear's rows of a 'linear' masks file (``...layers.12.mlp::up``) add the Linear (``12 up``)."""
    name, _, linear = name.partition("::")
    numbers = re.findall(r"\.(\d+)(?:\.|$)", name)
    parts = [p for p in name.split(".") if p not in ("mlp", "model")]
    label = numbers[-1] if numbers else parts[-1] if parts else name
    return f"{label} {linear}" if linear else label


def _pyplot(purpose: str = "--plot"):
    matplotlib = require("matplotlib", purpose)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _by_tower(names, tower_of) -> dict[str, list[str]]:
    from .select import natural_key
    out = {}
    for name in sorted(names, key=natural_key):
        out.setdefault(tower_of(name), []).append(name)
    return {t: out[t] for t in in_tower_order(out)}


def _panels(plt, towers: dict[str, list[str]], title: str):
    widths = [max(len(v), 2) for v in towers.values()]
    fig, axes = plt.subplots(1, len(towers), figsize=(min(2.5 + 0.32 * sum(widths) + 1.2 * len(towers), 22), 4.2),
                             gridspec_kw={"width_ratios": widths}, squeeze=False)
    fig.suptitle(title, fontsize=10)
    return fig, axes[0]


def _save(fig, path, bottom: float = 0.0) -> Path:
    path = Path(path)
    if path.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise ValueError(f"--plot {path}: give a .png, .pdf or .svg file")
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(path, dpi=130)
    return path


def plot_masks(masks, path, source: str = "masks") -> Path:
    """The pruned share of every layer, per tower (see the module docstring); returns ``path``."""
    plt = _pyplot()
    towers = _by_tower(masks.keep, masks.tower)
    d = masks.description
    how = ", ".join(f"{k} {d[k]}" for k in ("strategy", "alpha") if d.get(k) is not None)
    what = "Linear rows" if masks.site == "linear" else f"{masks.site} neurons"
    title = (f"{source}: {masks.num_pruned()} of {masks.num_total()} {what} pruned "
             f"({100 * masks.fraction():.2f} %){'; ' + how if how else ''}")
    fig, axes = _panels(plt, towers, title)
    for ax, (tower, layers) in zip(axes, towers.items()):
        pruned = [int((~masks.keep[n]).sum()) for n in layers]
        share = [100 * p / masks.keep[n].numel() for p, n in zip(pruned, layers)]
        x = range(len(layers))
        ax.bar(x, share, color=TOWER_COLOURS.get(tower, "tab:gray"), width=0.8)
        top = max(share + [1e-9])
        for i, (p, s) in enumerate(zip(pruned, share)):
            if len(layers) <= 40:
                ax.text(i, s + 0.02 * top, str(p), ha="center", va="bottom", fontsize=7)
        ax.set_ylim(0, top * 1.15 + 1e-9)
        rotate = len(layers) > 24 or (masks.site == "linear" and len(layers) > 6)
        ax.set_xticks(list(x), [layer_label(n) for n in layers], fontsize=7, rotation=90 if rotate else 0)
        p, n = masks.by_tower().get(tower, (sum(pruned), 0))
        ax.set_title(f"{tower}: {p} of {n} pruned", fontsize=9)
        ax.set_xlabel("layer and Linear (its output rows)" if masks.site == "linear" else "layer")
        ax.grid(axis="y", alpha=0.3)
    unit = "Linear's rows" if masks.site == "linear" else "layer's neurons"
    axes[0].set_ylabel(f"% of the {unit} pruned\n(number pruned above each bar)")
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_stats(stats, path, source: str = "statistics", site: str | None = None) -> Path:
    """Per layer, the distribution of the neurons' forget/retain RMS ratio in each modality (module docstring), at
    ``site``: by default 'hidden', or the first site the file has (one profiled with ``--sites pre up``)."""
    import torch
    from .select import scores
    if site is None:
        site = next((s for s in SITES if stats.layers(s)), "hidden")
    plt = _pyplot()
    ratio = {m: scores(stats, "selective-pruning", site=site, metric="rms", modality=m)
             for m in MODALITY_COLOURS if stats.group_ids(None, m)}
    names = dict.fromkeys(n for r in ratio.values() for n in r)
    towers = _by_tower(names, lambda n: stats.fingerprint["layers"][n].get("tower", "unknown"))
    title = (f"{source}: forget/retain RMS activation of each neuron, per layer (site {site})\n"
             "boxes: quartiles, whiskers: 5-95 %, dot: the most forget-specific neuron")
    fig, axes = _panels(plt, towers, title)
    for ax, (tower, layers) in zip(axes, towers.items()):
        present = {m: r for m, r in ratio.items() if any(n in r for n in layers)}
        step = 0.8 / max(len(present), 1)
        for k, (modality, by_layer) in enumerate(present.items()):
            rows = [(i, torch.log10(by_layer[n].clamp_min(1e-12)).float()) for i, n in enumerate(layers) if n in by_layer]
            if not rows:
                continue
            pos = [i - 0.4 + step * (k + 0.5) for i, _ in rows]
            q = [torch.quantile(v, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])).tolist() for _, v in rows]
            colour = MODALITY_COLOURS[modality]
            ax.bxp([{"whislo": a, "q1": b, "med": c, "q3": d, "whishi": e, "fliers": []} for a, b, c, d, e in q],
                   positions=pos, widths=step * 0.8, showfliers=False, patch_artist=True,
                   boxprops={"facecolor": colour, "alpha": 0.55, "edgecolor": colour},
                   medianprops={"color": "black"}, whiskerprops={"color": colour}, capprops={"color": colour})
            ax.plot(pos, [float(v.max()) for _, v in rows], "o", color=colour, markersize=3,
                    label=f"{modality} data")
        ax.axhline(0.0, color="gray", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(layers)), [layer_label(n) for n in layers], fontsize=7,
                      rotation=90 if len(layers) > 24 else 0)
        ax.set_xlim(-0.6, len(layers) - 0.4)
        ax.set_title(tower, fontsize=9)
        ax.set_xlabel("layer")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("log10 forget RMS / retain RMS\n(0: as active on both; above: forget-specific)")
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=len(labels), frameon=False)
    out = _save(fig, path, bottom=0.06)
    plt.close(fig)
    return out


def plot_demo(summary: dict, path, targets: dict, experimental=()) -> None:
    """The demo's ``plot.png`` from its summary (rows with ``method, like, alpha, schedule`` and ``drop``: mean and
    sd over seeds per ``split/modality``): forget drop against retain drop per method and modality, one panel each,
    the region of ``targets`` (``forget_mean``, ``retain_mean``) shaded; each method's fixed fractions as a line
    labelled with alpha, its calibrated budgets as a star, and beside them, in grey, the random control of the same
    neuron counts; unpruned is the origin. Methods in ``experimental`` get a star in their title."""
    plt = _pyplot("the demo's plot")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    rows = summary["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "random"))
    schedules = list(dict.fromkeys(r["schedule"] for r in rows if r["alpha"] != "calibrated"))
    styles = {"single-shot": "-", "iterative": ":"}
    drops = [r["drop"][f"{s}/{m}"][0] for r in rows for s in SPLITS for m in MODALITIES]
    top = max([targets["forget_mean"] + 10] + drops) + 8
    right = max([targets["retain_mean"] + 3] + [r["drop"][f"retain/{m}"][0] for r in rows for m in MODALITIES]) + 2
    fig, axes = plt.subplots(len(MODALITIES), len(methods), figsize=(max(2.9 * len(methods) + 1, 9.5), 6.6), sharex=True,
                             sharey=True, squeeze=False)

    palette = [c for c in (f"C{i}" for i in range(10)) if c not in ("C2", "C7")]  # not the target's green, not grey
    colour_of = {m: palette[i % len(palette)] for i, m in enumerate(methods)}
    placed = {}  # per panel: the pixel boxes of the alpha labels already drawn

    def label(ax, text, xy, colour):
        """An alpha label next to its point, at the first offset whose box overlaps no earlier label of the panel."""
        px, py = ax.transData.transform(xy)
        boxes = placed.setdefault(id(ax), [])
        for dx, dy in ((6, -4), (6, 7), (-30, 5), (-30, -9), (6, -15), (6, 17)):
            box = (px + dx, py + dy, px + dx + 26, py + dy + 10)
            if all(box[2] < b[0] or b[2] < box[0] or box[3] < b[1] or b[3] < box[1] for b in boxes):
                break
        boxes.append(box)
        ax.annotate(text, xy, xytext=(dx, dy), textcoords="offset points", fontsize=7, color=colour,
                    bbox={"boxstyle": "square,pad=0.05", "fc": "white", "ec": "none", "alpha": 0.8}, zorder=5)

    def draw(ax, group, modality, colour, marker, label_alpha):
        group = sorted(group, key=lambda r: -1 if r["alpha"] == "calibrated" else r["alpha"])
        xs = [r["drop"][f"retain/{modality}"] for r in group]
        ys = [r["drop"][f"forget/{modality}"] for r in group]
        ax.errorbar([x[0] for x in xs], [y[0] for y in ys], xerr=[x[1] for x in xs], yerr=[y[1] for y in ys],
                    fmt=marker, color=colour, ms=11 if marker == "*" else 4, capsize=2, elinewidth=0.8, alpha=0.9,
                    zorder=3 if colour != "0.55" else 2)
        if label_alpha:
            for r, x, y in zip(group, xs, ys):
                label(ax, f"{r['alpha']:g}%", (x[0], y[0]), colour)

    for col, method in enumerate(methods):
        for row_i, modality in enumerate(MODALITIES):
            ax = axes[row_i][col]
            ax.set_xlim(-2, right)
            ax.set_ylim(-5, top)
            ax.add_patch(plt.Rectangle((-100, targets["forget_mean"]), 100 + targets["retain_mean"], 200,
                                       color="tab:green", alpha=0.12, lw=0, zorder=0))
            ax.plot([0], [0], "k+", ms=9, zorder=4)
            for schedule in schedules:
                own = [r for r in rows if r["method"] == method and r["schedule"] == schedule
                       and r["alpha"] != "calibrated"]
                ctrl = [r for r in rows if r["method"] == "random" and r["like"] == method
                        and r["schedule"] == schedule and r["alpha"] != "calibrated"]
                for group, colour, label_alpha in ((own, colour_of[method], True), (ctrl, "0.55", False)):
                    if group:
                        draw(ax, group, modality, colour, styles.get(schedule, "-") + "o", label_alpha)
            for like, colour in ((None, colour_of[method]), (method, "0.55")):
                cal = [r for r in rows if r["alpha"] == "calibrated" and r["like"] == like
                       and r["method"] == (method if like is None else "random")]
                if cal:
                    draw(ax, cal, modality, colour, "*", False)
            ax.grid(alpha=0.25)
            if row_i == 0:
                ax.set_title(method + ("*" if method in experimental else ""), fontsize=10)
            if col == 0:
                ax.set_ylabel(f"{modality}: forget drop (points)")
            if row_i == len(MODALITIES) - 1:
                ax.set_xlabel("retain drop (points)")
    handles = [Patch(color="tab:green", alpha=0.3, label=f"target: forget drop >= {targets['forget_mean']:g}, "
                                                         f"retain drop <= {targets['retain_mean']:g}"),
               Line2D([], [], color="C0", marker="o", ms=4, label="fixed alpha (% of the language model)"),
               Line2D([], [], color="C0", marker="*", ms=10, ls="", label="calibrated per-layer budgets"),
               Line2D([], [], color="0.55", marker="o", ms=4, label="random control (same counts per layer)"),
               Line2D([], [], color="k", marker="+", ms=9, ls="", label="unpruned")]
    if len(schedules) > 1:
        handles.append(Line2D([], [], color="C0", ls=":", marker="o", ms=4, label="iterative schedule"))
    n = len(summary["seeds"])
    fig.suptitle(f"Neuron unlearning on the tiny LLaVA: accuracy drops, mean ± sd over {n} seed{'s' if n > 1 else ''}\n"
                 "upper left is better: forgets the forget set, keeps the rest; * experimental", fontsize=10)
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)
