"""manu-fast: profile a model, select neurons, prune, report, or run the demo.

    manu-fast profile MODEL_DIR stats.safetensors --synthetic            # a model saved by `manu-fast demo`
    manu-fast profile MODEL_DIR stats.safetensors --forget F.parquet --retain R.parquet   # MLLMU-Bench-style
    manu-fast select stats.safetensors masks.safetensors --strategy manu-code --alpha 2
    manu-fast prune MODEL_DIR masks.safetensors PRUNED_DIR
    manu-fast report stats.safetensors   (or masks.safetensors)
    manu-fast evaluate MODEL_DIR --forget F.parquet --retain R.parquet [--masks masks.safetensors] [--json out.json]
    manu-fast demo --help

Errors (bad arguments, missing or refused files) print one line on stderr and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from .stats import DEFAULT_TAU, StatsFileError

EXIT_USAGE = 2
DEMO_CONFIG = "manu_fast_demo.json"  # written by manu_fast.demo next to the model it trained
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class UsageError(Exception):
    """A bad command line: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


# ---------------------------------------------------------------------------------------------------- model loading
def _dtype(name: str):
    import torch
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    return table[name]


def load_model(path, dtype: str = "float32", device: str = "cpu"):
    """A model saved with ``save_pretrained`` in ``path``, with the first HF auto class that accepts its config."""
    import transformers as tf
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model folder not found or has no config.json: {path}")
    config = tf.AutoConfig.from_pretrained(path)
    for auto in (tf.AutoModelForImageTextToText, tf.AutoModelForCausalLM, tf.AutoModel):
        if type(config) in auto._model_mapping:
            model = auto.from_pretrained(path, dtype=_dtype(dtype))
            return model.to(device).eval()
    raise ValueError(f"{path}: no transformers auto class loads model type {config.model_type!r}")


# ---------------------------------------------------------------------------------------------------- profile
def _synthetic_data(model, model_dir: Path, args, device) -> dict:
    from . import demo
    cfg_file = model_dir / DEMO_CONFIG
    if not cfg_file.is_file():
        raise FileNotFoundError(f"--synthetic needs a model trained by `manu-fast demo` ({cfg_file} is missing)")
    data = demo.benchmark(demo.ModelConfig(**json.loads(cfg_file.read_text())))
    profiling, _ = demo.question_sets(data, model, args.forget_percent, args.profile_positions, args.batch_size)
    return {key: [b.to(device).inputs for b in batches] for key, batches in profiling.items()}


class _EncodedItems:
    """MLLMU-Bench items of one modality (question + answer), encoded by the model's processor ``batch_size`` at a
    time when iterated (re-iterable, so a resumed run re-reads the same batches)."""

    def __init__(self, processor, items, batch_size: int, device, dtype):
        self.processor, self.items, self.batch_size = processor, items, batch_size
        self.device, self.dtype = device, dtype

    def __len__(self):
        return -(-len(self.items) // self.batch_size)

    def __iter__(self):
        from .data import encode_items
        for i in range(0, len(self.items), self.batch_size):
            yield encode_items(self.processor, self.items[i:i + self.batch_size], with_answer=True,
                               device=self.device, dtype=self.dtype)


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")


def load_processor(path):
    """The HF processor (tokenizer + image processor + chat template) saved next to the model in ``path``."""
    from transformers import AutoProcessor
    if not Path(path).is_dir():
        raise FileNotFoundError(f"model folder not found: {path}")
    try:
        return AutoProcessor.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: no usable processor saved with the model (save the model's processor there with "
                         f"save_pretrained): {e}") from None


def _parquet_data(processor, args, device) -> dict:
    from .data import MODALITIES, load_mllmu_profiles
    out = {}
    for split, path in (("forget", args.forget), ("retain", args.retain)):
        items = load_mllmu_profiles(path)
        for modality in MODALITIES:
            out[split, modality] = _EncodedItems(processor, [i for i in items if i.modality == modality],
                                                 args.batch_size, device, _dtype(args.dtype))
    return out


def cmd_profile(args) -> None:
    from .profiler import profile
    if args.synthetic == bool(args.forget or args.retain) or bool(args.forget) != bool(args.retain):
        raise UsageError("profile: give either --synthetic or both --forget and --retain")
    if args.resume and not args.checkpoint:
        raise UsageError("profile: --resume needs --checkpoint PATH")
    _check_batch_size(args.batch_size)
    device = args.device
    if args.distributed:
        from . import distributed as mdist
        rank, _ = mdist.init()
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    model_dir = Path(args.model)
    processor = None if args.synthetic else load_processor(model_dir)  # before the (maybe large) model
    model = load_model(model_dir, args.dtype, device)
    data = (_synthetic_data(model, model_dir, args, device) if args.synthetic
            else _parquet_data(processor, args, device))
    if args.distributed:
        data = {key: mdist.Shard(batches) for key, batches in data.items()}
    stats = profile(model, data, sites=tuple(args.sites), tau=args.tau, towers=args.towers,
                    progress=not args.no_progress, checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every,
                    resume=args.resume, on_nonfinite=args.on_nonfinite, distributed=args.distributed)
    if args.distributed:
        mdist.save_stats(stats, args.out)
        if mdist.rank_and_world()[0] != 0:
            return
    else:
        stats.save(args.out)
    print(f"wrote {args.out}: {len(stats.blocks)} (layer, site) blocks, groups {', '.join(stats.groups)}")


# ---------------------------------------------------------------------------------------------------- select / prune
def alpha_arg(text: str):
    """--alpha: a number, or KEY=number pairs separated by commas (KEY: a tower, a layer name or pattern)."""
    try:
        if "=" not in text:
            return float(text)
        return {tower.strip(): float(value) for tower, value in (part.split("=") for part in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or tower/layer=number,... pairs, got {text!r}") from None


def cmd_select(args) -> None:
    from .select import select_neurons
    from .stats import NeuronStats
    stats = NeuronStats.load(args.stats)
    masks = select_neurons(stats, args.strategy, args.alpha, per_layer=args.per_layer, site=args.site,
                           metric=args.metric, modality=args.modality, token_kinds=args.token_kinds,
                           towers=args.towers, seed=args.seed)
    masks.save(args.out)
    print(f"wrote {args.out}")
    print(format_masks(masks))


def cmd_prune(args) -> None:
    from .adapters import fingerprint
    from .masks import Masks, prune_weights
    from .stats import check_fingerprint
    model_dir, out = Path(args.model), Path(args.out)
    if out.resolve() == model_dir.resolve():
        raise UsageError("prune: OUT_DIR must differ from MODEL_DIR (the original weights are kept)")
    masks = Masks.load(args.masks)  # a damaged file is refused before the model is loaded
    model = load_model(model_dir, args.dtype, args.device)
    check_fingerprint(fingerprint(model), masks.fingerprint, args.masks)
    prune_weights(model, masks)
    model.save_pretrained(out)
    # tokenizer / processor files and the demo's config travel with the weights; config.json was just written
    for f in model_dir.iterdir():
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and not (out / f.name).exists() \
                and not f.name.endswith(".index.json"):
            shutil.copy2(f, out / f.name)
    print(f"wrote {out}: {masks.num_pruned()} of {masks.num_total()} {masks.site} entries zeroed")


# ---------------------------------------------------------------------------------------------------- evaluate
def cmd_evaluate(args) -> None:
    from .data import MODALITIES, load_mllmu_classification
    from .evaluate import evaluate_mc_items
    from .masks import Masks, apply_masks
    _check_batch_size(args.batch_size)
    model_dir = Path(args.model)
    masks = Masks.load(args.masks) if args.masks else None  # a damaged file is refused before the model is loaded
    processor = load_processor(model_dir)
    model = load_model(model_dir, args.dtype, args.device)
    if masks is not None:
        apply_masks(model, masks)
    results = {}
    for split, path in (("forget", args.forget), ("retain", args.retain)):
        items = load_mllmu_classification(path)
        for modality in MODALITIES:
            chosen = [i for i in items if i.modality == modality]
            if not chosen:
                raise ValueError(f"{path}: no {modality} classification questions")
            results[f"{split}/{modality}"] = evaluate_mc_items(model, processor, chosen, args.batch_size, args.device,
                                                               _dtype(args.dtype))
    print(_table(["data", "accuracy %", "answer prob", "questions"],
                 [[k, f"{100 * r['accuracy']:.2f}", f"{r['answer_prob']:.4f}", r["n"]] for k, r in results.items()]))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": str(model_dir), "masks": args.masks, "results": results},
                                              indent=2))
        print(f"wrote {args.json}")


# ---------------------------------------------------------------------------------------------------- report
def _table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in cells)


def format_masks(masks) -> str:
    d = masks.description
    what = ", ".join(f"{k}={d[k]}" for k in ("strategy", "alpha", "per_layer", "metric", "modality") if d.get(k) is not None)
    rows = [[t, f"{len([n for n in masks.keep if masks.tower(n) == t])}", p, n, f"{100 * p / n:.2f}"]
            for t, (p, n) in masks.by_tower().items()]
    rows.append(["total", len(masks.keep), masks.num_pruned(), masks.num_total(), f"{100 * masks.fraction():.2f}"])
    return (f"masks of model type {masks.fingerprint.get('model_type')!r}, site {masks.site!r}"
            + (f" ({what})" if what else "") + "\n" + _table(["tower", "layers", "pruned", "of", "%"], rows))


def format_stats(stats) -> str:
    from .select import natural_key
    from .stats import F
    order = ("vision", "projector", "language")
    towers, layers = {}, {}
    for key in sorted(stats.blocks, key=lambda k: (order.index(t) if (t := stats.fingerprint["layers"][k.split("::")[0]]
                                                                      .get("tower")) in order else 3, natural_key(k))):
        layer, site = key.split("::")
        tower = stats.fingerprint["layers"][layer].get("tower", "unknown")
        towers.setdefault(tower, set()).add(layer)
        layers.setdefault(tower, key)  # tokens per group: count of the tower's first block, neuron 0
    sites = sorted({k.split("::")[1] for k in stats.blocks})
    rows = [[g] + [int(stats.blocks[layers[t]][F["count"], i, 0]) for t in towers] for i, g in enumerate(stats.groups)]
    return (f"statistics of model type {stats.fingerprint.get('model_type')!r}, tau={stats.tau}, sites {', '.join(sites)}\n"
            f"layers: " + ", ".join(f"{t} {len(v)}" for t, v in towers.items()) + "\n"
            + _table(["group (tokens profiled)"] + list(towers), rows))


def cmd_report(args) -> None:
    from .masks import FORMAT as MASKS_FORMAT
    from .masks import Masks
    from .stats import FORMAT as STATS_FORMAT
    from .stats import NeuronStats
    path = Path(args.file)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            fmt = (f.metadata() or {}).get("format")
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise StatsFileError(f"{path}: not a readable safetensors file ({e})") from None
    if fmt == STATS_FORMAT:
        print(format_stats(NeuronStats.load(path)))
    elif fmt == MASKS_FORMAT:
        print(format_masks(Masks.load(path)))
    else:
        raise StatsFileError(f"{path}: neither a manu_fast statistics nor a masks file (format {fmt!r})")


# ---------------------------------------------------------------------------------------------------- demo
def cmd_demo(demo_args: list[str]) -> None:
    try:
        from . import demo
    except ImportError as e:
        raise UsageError(f"demo: the demo is not available in this installation ({e})") from None
    parser = _Parser(prog="manu-fast demo", description=(demo.__doc__ or "").splitlines()[0],
                     epilog="Each seed trains its own world; the table is mean ± sd over seeds, report.json has every "
                            "seed's rows. The strategies and the calibrated budgets: docs/SELECTION.md.")
    demo.add_arguments(parser)
    demo.main(parser.parse_args(demo_args))


# ---------------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from .masks import SITES
    from .select import METRICS, MODALITIES, STRATEGIES
    p = _Parser(prog="manu-fast", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    dev = argparse.ArgumentParser(add_help=False)
    dev.add_argument("--device", default="cpu", help="torch device to run the model on (default: %(default)s)")
    dev.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                     help="dtype to load the model in (default: %(default)s)")

    s = sub.add_parser("profile", parents=[dev], help="gather per-neuron statistics of a model over forget/retain data",
                       description="Run MODEL over forget and retain data, multimodal and text-only, and write the "
                                   "per-neuron statistics of every MLP to OUT (safetensors).")
    s.add_argument("model", help="model folder (written by save_pretrained)")
    s.add_argument("out", help="statistics file to write (.safetensors)")
    s.add_argument("--synthetic", action="store_true",
                   help="profile on the embedded synthetic benchmark (MODEL must be a model trained by `manu-fast demo`)")
    s.add_argument("--forget", help="MLLMU-Bench-style profile parquet of the forget set (with --retain)")
    s.add_argument("--retain", help="MLLMU-Bench-style profile parquet of the retain set (with --forget)")
    s.add_argument("--forget-percent", type=float, default=10.0,
                   help="--synthetic: percentage of the people to forget (default: %(default)s)")
    s.add_argument("--profile-positions", default="question", choices=("answer", "question", "all"),
                   help="--synthetic: token positions profiled in the language model (default: %(default)s)")
    s.add_argument("--batch-size", type=int, default=64, help="questions per batch (default: %(default)s)")
    s.add_argument("--sites", nargs="+", default=["hidden"], choices=SITES,
                   help="what to profile: hidden = MLP neuron h (default); pre/up = gate(fc1)/up_proj outputs "
                        "(the official code's convention); out = MLP output")
    s.add_argument("--tau", type=float, default=DEFAULT_TAU, help="activity threshold of the frequency metric (default: %(default)s)")
    s.add_argument("--towers", nargs="+", choices=("vision", "projector", "language"),
                   help="profile only these towers (default: all)")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.add_argument("--checkpoint", help="write the statistics so far to this file every --checkpoint-every batches "
                                        "(atomic), so that a killed run can continue with --resume")
    s.add_argument("--checkpoint-every", type=int, default=50, help="batches between checkpoints (default: %(default)s)")
    s.add_argument("--resume", action="store_true",
                   help="continue from --checkpoint if it exists (batches already in it are skipped, not re-counted)")
    s.add_argument("--on-nonfinite", default="count", choices=("count", "error"),
                   help="NaN/Inf activations: count and exclude them (default), or stop with an error naming the layer")
    s.add_argument("--distributed", action="store_true",
                   help="data-parallel over torchrun's processes: each rank profiles every world-th batch, the "
                        "statistics are merged exactly and rank 0 writes OUT (see docs/ROBUSTNESS.md)")
    s.set_defaults(func=cmd_profile)

    s = sub.add_parser("select", help="choose neurons to prune from a statistics file",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Score neurons from STATS with a strategy and write the masks of the top ALPHA % to "
                                   "OUT (safetensors).\nEvery formula, its source and the top-k rules: "
                                   "docs/SELECTION.md.",
                       epilog="examples:\n"
                              "  manu-fast select stats.safetensors m.safetensors --strategy manu-code --alpha 2\n"
                              "  manu-fast select stats.safetensors m.safetensors --strategy power-ratio \\\n"
                              "      --alpha 'vision=10,projector=10,*language_model.layers.31.mlp=50'\n"
                              "  manu-fast select stats.safetensors m.safetensors --strategy selective-pruning "
                              "--metric abs --modality text --alpha 5")
    s.add_argument("stats", help="statistics file written by `manu-fast profile`")
    s.add_argument("out", help="masks file to write (.safetensors)")
    s.add_argument("--strategy", default="manu-code", choices=STRATEGIES,
                   help="manu-code: the official MANU code's score (image towers on multimodal, language model on "
                        "text-only data), top alpha %% per tower; power-ratio: this project's, forget/retain mean a^2 "
                        "summed over the modalities each layer sees (the language model: both), top alpha %% per "
                        "tower or per named layer; selective-pruning: one metric, forget/retain, one modality; "
                        "manu-paper: EXPERIMENTAL, our reading of the paper's cross-modal formula, selects neurons that "
                        "carry nothing on the demo; random: the control (default: %(default)s)")
    s.add_argument("--alpha", type=alpha_arg, default=2.0,
                   help="percentage of neurons to prune, in (0, 100); or KEY=PERCENT pairs separated by commas, a KEY "
                        "being a tower (vision, projector, language: top-k over that tower) or a layer name or "
                        "fnmatch pattern (e.g. '*language_model.layers.31.mlp': each matching layer is its own top-k "
                        "pool, a per-layer budget); layers named nowhere are not pruned (default: %(default)s)")
    s.add_argument("--per-layer", action="store_true", help="top alpha %% of each layer instead of per tower / global")
    s.add_argument("--site", default="hidden", choices=SITES, help="which profiled site to select at (default: %(default)s)")
    s.add_argument("--metric", choices=METRICS, help="selective-pruning: the metric (default: freq)")
    s.add_argument("--modality", choices=MODALITIES, help="selective-pruning: the data modality (default: text)")
    s.add_argument("--token-kinds", nargs="+", choices=("image", "text"),
                   help="pool only these token kinds of each (split, modality), e.g. text: the language model's "
                        "text positions, not its image-token positions (default: all)")
    s.add_argument("--towers", nargs="+", choices=("vision", "projector", "language"),
                   help="score only these towers (default: every tower the strategy's data reaches)")
    s.add_argument("--seed", type=int, default=0, help="random: the seed (default: %(default)s)")
    s.set_defaults(func=cmd_select)

    s = sub.add_parser("prune", parents=[dev], help="zero the selected neurons' weights and save the pruned model",
                       description="Permanently zero the weights of the neurons pruned by MASKS in MODEL and save the "
                                   "result to OUT_DIR; it loads with stock transformers (from_pretrained).")
    s.add_argument("model", help="model folder (written by save_pretrained)")
    s.add_argument("masks", help="masks file written by `manu-fast select`")
    s.add_argument("out", help="folder to write the pruned model to (must differ from MODEL)")
    s.set_defaults(func=cmd_prune)

    s = sub.add_parser("evaluate", parents=[dev], help="multiple-choice accuracy on MLLMU-Bench classification data",
                       description="Ask MODEL (optionally with MASKS applied) the multiple-choice questions of the "
                                   "forget and retain MLLMU-Bench classification parquet files, with the image and "
                                   "text-only, and print the accuracy per split and modality.")
    s.add_argument("model", help="model folder (written by save_pretrained, with its processor)")
    s.add_argument("--forget", required=True, help="MLLMU-Bench-style classification parquet of the forget set")
    s.add_argument("--retain", required=True, help="MLLMU-Bench-style classification parquet of the retain set")
    s.add_argument("--masks", help="masks file written by `manu-fast select`, applied (reversibly) before evaluating")
    s.add_argument("--batch-size", type=int, default=16, help="questions per batch (default: %(default)s)")
    s.add_argument("--json", help="also write the results to this JSON file")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("report", help="summarise a statistics or masks file",
                       description="Print a summary of a statistics file (layers per tower, groups, tokens profiled) "
                                   "or a masks file (how it was made, pruned neurons per tower).")
    s.add_argument("file", help="a .safetensors statistics or masks file")
    s.set_defaults(func=cmd_report)

    # listed for --help only: main() hands `demo ...` to the demo's own parser (imported lazily)
    sub.add_parser("demo", help="the whole pipeline on the embedded benchmark (see `manu-fast demo --help`)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["demo"]:
            cmd_demo(argv[1:])
        else:
            args = build_parser().parse_args(argv)
            args.func(args)
    except (UsageError, StatsFileError, FileNotFoundError, ValueError, OSError) as e:
        message = " ".join(str(e).split())  # one line, whatever the library wrote
        print(f"manu-fast: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
