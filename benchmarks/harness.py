"""Benchmark plumbing: mode and sizes, timing, peak memory, result rows (JSON lines), tables and the ratio plot.

Nothing here touches CUDA at import time: the device is chosen when the session fixture asks for it.
"""
from __future__ import annotations

import ctypes
import datetime as _dt
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

MODES = ("quick", "full")
RESULTS_FILE = "results.jsonl"
PLOT_FILE = "ratio_to_plain.png"
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
LONG_CALL_S = 0.5


def bench_mode() -> str:
    mode = os.environ.get("MANU_FAST_BENCH_MODE", "quick")
    if mode not in MODES:
        raise ValueError(f"MANU_FAST_BENCH_MODE={mode!r}; choose one of {MODES}")
    return mode


def out_dir() -> Path:
    path = Path(os.environ.get("MANU_FAST_BENCH_OUT") or DEFAULT_OUT)
    path.mkdir(parents=True, exist_ok=True)
    return path


def bench_device() -> torch.device:
    """CUDA when present (override with MANU_FAST_BENCH_DEVICE=cpu|cuda), else CPU."""
    forced = os.environ.get("MANU_FAST_BENCH_DEVICE")
    if forced:
        return torch.device(forced)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def environment(device: torch.device) -> dict:
    """What every absolute figure is reported with: device, versions, backend the dispatch picks."""
    from manu_fast.ops import pick_backend

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{_cpu_name()} ({torch.get_num_threads()} threads)"
    return {"device": name, "device_type": device.type, "torch": torch.__version__, "triton": _version("triton"),
            "transformers": _version("transformers"), "python": platform.python_version(),
            "fused_backend": pick_backend(device), "mode": bench_mode(),
            "load_avg_1min": round(os.getloadavg()[0], 2)}  # other work on the machine skews CPU timings


@dataclass
class Timing:
    median_ms: float
    low_ms: float   # 20th percentile (GPU, do_bench) or 25th (CPU, torch.utils.benchmark)
    high_ms: float  # 80th / 75th percentile
    samples: int    # CPU: timed samples (blocks of calls); -1 on CUDA (do_bench decides)


def measure_peers(fns: dict, device: torch.device, max_s: float, min_samples: int = 1) -> tuple[dict, dict, dict]:
    """Call every ``fns[name]()`` once (its result and peak extra memory are returned, to be checked), then time them.

    Returns (results, peak bytes, Timing) dicts keyed like ``fns``. The first call is the warm-up and is not timed.
    CPU: ``torch.utils.benchmark.Timer`` samples, taken in interleaved rounds (one sample of each peer per round) so
    that load from other processes drifts over all peers alike; each peer gets about ``max_s`` seconds of samples
    (at least ``min_samples``), each sample a block of calls lasting >= 10 ms; the median is reported with the quartiles.
    CUDA: ``triton.testing.do_bench`` (quantiles 0.5/0.2/0.8) per peer; peers whose first call took over
    LONG_CALL_S (a whole-model profiling pass) are timed instead in ``min_samples`` interleaved rounds of one call
    each (CUDA-synchronised wall time), since do_bench would repeat them dozens of times.
    """
    first, peaks, seconds = {}, {}, {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        first[name], peaks[name] = run_with_peak(fn, device)
        seconds[name] = time.perf_counter() - t0
    if device.type == "cuda" and max(seconds.values()) > LONG_CALL_S:
        samples = {name: [] for name in fns}
        for _ in range(max(min_samples, 3)):
            for name, fn in fns.items():
                torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                fn()
                torch.cuda.synchronize(device)
                samples[name].append(time.perf_counter() - t0)
        return first, peaks, {name: _timing(times) for name, times in samples.items()}
    if device.type == "cuda":
        from triton.testing import do_bench

        timings = {}
        for name, fn in fns.items():
            med, lo, hi = do_bench(fn, warmup=25, rep=max(100, int(max_s * 100)), quantiles=[0.5, 0.2, 0.8])
            timings[name] = Timing(med, lo, hi, -1)
        return first, peaks, timings
    from torch.utils.benchmark import Timer

    timers = {name: Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()) for name, fn in fns.items()}
    number = {name: max(1, int(0.01 / max(t, 1e-9))) for name, t in seconds.items()}
    wanted = {name: min(50, max(min_samples, int(max_s / max(t, 1e-9)))) for name, t in seconds.items()}
    samples = {name: [] for name in fns}
    for r in range(max(wanted.values())):
        for name, timer in timers.items():
            if r < wanted[name]:
                samples[name].append(timer.timeit(number[name]).median)
    return first, peaks, {name: _timing(times) for name, times in samples.items()}


def _timing(seconds_per_call: list[float]) -> Timing:
    t = sorted(x * 1e3 for x in seconds_per_call)
    q = lambda p: t[min(len(t) - 1, int(p * (len(t) - 1) + 0.5))]  # noqa: E731
    mid = len(t) // 2
    median = t[mid] if len(t) % 2 else (t[mid - 1] + t[mid]) / 2
    return Timing(median, q(0.25), q(0.75), len(t))


def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise KeyError(field_name)


def run_with_peak(fn, device: torch.device):
    """Call ``fn()`` once; return (its result, peak memory above what was allocated before it ran).

    CUDA: ``torch.cuda.max_memory_allocated``. CPU (Linux, glibc): growth of the process's peak resident set (VmHWM,
    reset through /proc/self/clear_refs) after ``malloc_trim`` returned the allocator's free pages, so that reused
    memory is counted again; still a lower bound (the allocator may keep some free pages resident).
    The peak is None where neither is available.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, torch.cuda.max_memory_allocated(device) - base
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        base = _rss_kib("VmRSS")
    except (OSError, KeyError):
        return fn(), None
    out = fn()
    return out, max(0, _rss_kib("VmHWM") - base) * 1024


def fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def fmt_ms(ms: float | None) -> str:
    if ms is None or (isinstance(ms, float) and math.isnan(ms)):
        return "-"
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.0f}"


@dataclass
class Results:
    """Rows of one benchmark session: printed as tables, appended to ``results.jsonl``, plotted at the end."""

    env: dict
    out: Path
    run_id: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ"))
    rows: list[dict] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)

    def report(self, level: str, case: str, title: str, entries: list[dict], baseline: str = "plain",
               columns: tuple[str, ...] = ()) -> list[dict]:
        """Record one table: ``entries`` are dicts with ``peer`` and optionally ``timing`` (Timing), ``held_bytes``,
        ``peak_bytes``, ``shapes``, ``dtype``, ``note`` and extra scalar columns named in ``columns``.
        Ratios are against the ``baseline`` peer's median in the same table."""
        base = next((e["timing"].median_ms for e in entries if e["peer"] == baseline and e.get("timing")), None)
        stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        rows = []
        for e in entries:
            t: Timing | None = e.get("timing")
            row = {"run_id": self.run_id, "timestamp": stamp, **self.env, "level": level, "case": case,
                   "peer": e["peer"], "shapes": e.get("shapes"), "dtype": e.get("dtype"),
                   "median_ms": t.median_ms if t else None, "low_ms": t.low_ms if t else None,
                   "high_ms": t.high_ms if t else None, "samples": t.samples if t else None,
                   "ratio_to_plain": (t.median_ms / base) if (t and base) else None,
                   "held_bytes": e.get("held_bytes"), "peak_bytes": e.get("peak_bytes"), "note": e.get("note", "")}
            row.update({c: e.get(c) for c in columns})
            rows.append(row)
        self.rows.extend(rows)
        with open(self.out / RESULTS_FILE, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        text = self._table(title, rows, baseline, columns)
        self.tables.append(text)
        print("\n" + text, flush=True)
        return rows

    def _table(self, title: str, rows: list[dict], baseline: str, columns: tuple[str, ...]) -> str:
        head = ["peer", "shapes", "dtype", "median ms", f"x {baseline}", "held", "peak extra", *columns, "note"]
        lines = [f"**{title}** — {self.env['device']}, torch {self.env['torch']}, mode {self.env['mode']}", "",
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            ratio = f"{r['ratio_to_plain']:.2f}" if r["ratio_to_plain"] is not None else "-"
            extra = [_fmt_cell(r.get(c)) for c in columns]
            cells = [r["peer"], str(r["shapes"] or "-"), str(r["dtype"] or "-"), fmt_ms(r["median_ms"]), ratio,
                     fmt_bytes(r["held_bytes"]), fmt_bytes(r["peak_bytes"]), *extra, r["note"] or ""]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def finish(self) -> None:
        """Write the ratio plot and a markdown summary of this session's tables next to the results."""
        if not self.rows:
            return
        (self.out / f"summary_{self.env['device_type']}_{self.env['mode']}.md").write_text(
            f"Run {self.run_id}: {self.env}\n\n" + "\n\n".join(self.tables) + "\n")
        plot_ratios(self.rows, self.out / PLOT_FILE, f"{self.env['device']} — run {self.run_id} ({self.env['mode']})")


def _fmt_cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def plot_ratios(rows: list[dict], path: Path, title: str) -> None:
    """Bar chart of time / plain per peer, one panel per level (log scale; 1 = as fast as the plain forward)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r["ratio_to_plain"] is not None]
    levels = list(dict.fromkeys(r["level"] for r in timed))
    if not levels:
        return
    all_peers = list(dict.fromkeys(r["peer"] for r in timed))
    colors = {peer: plt.get_cmap("tab10")(i % 10) for i, peer in enumerate(all_peers)}  # one colour per peer throughout
    fig, axes = plt.subplots(len(levels), 1, figsize=(11, 3.2 * len(levels)), squeeze=False)
    for ax, level in zip(axes[:, 0], levels):
        lr = [r for r in timed if r["level"] == level]
        cases = list(dict.fromkeys(f"{r['case']} {r['dtype'] or ''}".strip() for r in lr))
        peers = list(dict.fromkeys(r["peer"] for r in lr))
        width = 0.8 / len(peers)
        for i, peer in enumerate(peers):
            vals = {f"{r['case']} {r['dtype'] or ''}".strip(): r["ratio_to_plain"] for r in lr if r["peer"] == peer}
            xs = [j + i * width for j, c in enumerate(cases) if c in vals]
            ax.bar(xs, [vals[c] for c in cases if c in vals], width, label=peer, color=colors[peer])
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
        ax.set_xticklabels(cases, fontsize=7, rotation=12)
        ax.set_ylabel("time / plain")
        ax.set_title(level, fontsize=9)
        ax.legend(fontsize=7, ncol=min(len(peers), 7))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def available_bytes(device: torch.device) -> int:
    """Memory a peer could still allocate on ``device`` (free GPU memory, or available system RAM)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available
