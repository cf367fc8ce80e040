"""manu-fast: profile a model, select neurons, prune, evaluate, report, or run the demo.

    manu-fast profile MODEL_DIR stats.safetensors --synthetic            # a model saved by `manu-fast demo`
    manu-fast profile MODEL_DIR stats.safetensors --forget F --retain R [--qa ft_Data] [--names names.json]
    manu-fast profile MODEL_DIR stats.safetensors --benchmark clear --forget forget10+tofu --retain retain90+tofu
    manu-fast select stats.safetensors masks.safetensors --strategy manu-code --alpha 2
    manu-fast prune MODEL_DIR masks.safetensors PRUNED_DIR
    manu-fast report stats.safetensors   (or masks.safetensors, or MODEL_DIR: its MLPs per tower, what is left out)
    manu-fast evaluate MODEL_DIR --forget F --retain R [--protocol logit|mllmu|clear] [--masks M] [--json out.json]
    manu-fast report masks.safetensors --plot where.png   (selected neurons per layer and tower; for a stats file,
                                                         the forget/retain score distribution per layer)
    manu-fast demo --help

MODEL: a folder written by save_pretrained or a Hugging Face hub id (llava-hf/llava-1.5-7b-hf).
`manu-fast --version`: the versions and which backend (C++, Triton, PyTorch reference) runs on each device.
Errors (bad arguments, missing or refused files, a full disk, no CUDA) print one line on stderr and exit with
status 2; an internal error prints its traceback and exits with status 1. No command writes over one of its inputs
or into the model folder it reads (docs/ROBUSTNESS.md).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from .paths import check_outputs
from .schema import (BENCHMARKS, CLEAR_DS_SIZE, DEFAULT_TAU, DTYPE_NAMES, GENERATION_INPUTS, METRICS, MLLMU_TASKS,
                     MODALITIES, MOE_POLICIES, NONFINITE_POLICIES, OFFICIAL_LAYERS, PROFILE_MODES, PROTOCOLS, SITES,
                     SPLITS, STRATEGIES,
                     TOKEN_KINDS, TOWERS, StatsFileError, in_tower_order)

EXIT_USAGE = 2
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
MODEL_HELP = ("model folder (written by save_pretrained) or hub id such as llava-hf/llava-1.5-7b-hf (downloaded to, "
              "or offline read from, the Hugging Face cache)")


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


def _auto_class(model):
    """(config, the first HF auto class that accepts it) of ``model``, a folder or a hub id (manu_fast.sources)."""
    import transformers as tf
    from .sources import load_config
    config = load_config(model)
    for auto in (tf.AutoModelForImageTextToText, tf.AutoModelForCausalLM, tf.AutoModel):
        if type(config) in auto._model_mapping:
            return config, auto
    raise ValueError(f"{model}: no transformers auto class loads model type {config.model_type!r}")


def check_device(device: str) -> None:
    """Refuse, before any model is loaded, a --device that this machine does not have."""
    import torch
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:1, mps ...)") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise UsageError(f"--device {device}: this machine (or this torch build) has no CUDA device; use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise UsageError(f"--device {device}: this machine has {count} CUDA device(s) (cuda:0 .. cuda:{count - 1})")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {device}: unsupported device type {dev.type!r} (cpu, cuda, mps)")


def _inputs(args, *names) -> dict:
    """{--option: path} of the given path options of ``args`` (for manu_fast.paths.check_outputs)."""
    return {f"--{n.replace('_', '-')}": getattr(args, n) for n in names}


def load_model(model, dtype: str = "float32", device: str = "cpu"):
    """``model`` (a folder written by ``save_pretrained`` or a hub id), with the first HF auto class that accepts
    its config."""
    _, auto = _auto_class(model)
    return auto.from_pretrained(str(model), dtype=_dtype(dtype)).to(device).eval()


def model_skeleton(model):
    """``model`` (folder or hub id) built from its config alone on the 'meta' device (no weights read)."""
    import torch
    config, auto = _auto_class(model)
    with torch.device("meta"):
        return auto.from_config(config)


def _announce(what: str, device: str, dtype: str) -> None:
    """The one line a long command prints first: device, dtype and the backend that runs (with the fix when a
    compiled backend is missing, said here once instead of a warning inside a progress bar)."""
    import torch
    from .ops import describe_backend, fallback_announced
    print(f"manu-fast {what}: device {device}, dtype {dtype}, backend: {describe_backend(torch.device(device))}",
          file=sys.stderr)
    fallback_announced()


# ---------------------------------------------------------------------------------------------------- profile
def _synthetic_benchmark(model_dir):
    """The synthetic benchmark of a model trained by `manu-fast demo`, from its config (read before the model)."""
    from . import demo
    from .sources import local_files
    folder = local_files(model_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {model_dir}")
    cfg_file = folder / demo.DEMO_CONFIG
    if not cfg_file.is_file():
        raise FileNotFoundError(f"--synthetic needs a model trained by `manu-fast demo` ({cfg_file} is missing)")
    try:
        return demo.benchmark(demo.ModelConfig(**json.loads(cfg_file.read_text())))
    except (ValueError, TypeError, RecursionError) as e:
        raise ValueError(f"{cfg_file}: not a configuration written by `manu-fast demo` ({e})") from None


def _synthetic_data(model, benchmark, args, device) -> dict:
    from . import demo
    profiling, _ = demo.question_sets(benchmark, model, args.forget_percent, args.profile_positions, args.batch_size)
    return {key: [b.to(device).inputs for b in batches] for key, batches in profiling.items()}


class _EncodedItems:
    """Benchmark items of one modality (question + answer), encoded by the model's processor ``batch_size`` at a
    time when iterated (re-iterable, so a resumed run re-reads the same batches)."""

    def __init__(self, processor, items, batch_size: int, device, dtype):
        self.processor, self.items, self.batch_size = processor, items, batch_size
        self.device, self.dtype = device, dtype

    def __len__(self):
        return -(-len(self.items) // self.batch_size)

    def __iter__(self):
        from .datasets import encode_items
        for i in range(0, len(self.items), self.batch_size):
            yield encode_items(self.processor, self.items[i:i + self.batch_size], with_answer=True,
                               device=self.device, dtype=self.dtype)


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")


def load_processor(model):
    """The HF processor (tokenizer + image processor + chat template) saved with ``model`` (folder or hub id)."""
    from .sources import load_processor as load
    return load(model)


def _profile_items(args) -> dict:
    """{split: items} read from --forget / --retain (before the model is loaded, so bad data fails fast)."""
    from .datasets import DataError, load_clear_profiles, load_mllmu_profiles, load_names
    if args.benchmark == "clear" and (args.names or args.qa):
        raise UsageError("profile: --names and --qa are for --benchmark mllmu (CLEAR's captions hold the names)")
    names = load_names(args.names) if args.names else None
    out = {}
    for split, path in (("forget", args.forget), ("retain", args.retain)):
        items = (load_clear_profiles(path, args.seed) if args.benchmark == "clear"
                 else load_mllmu_profiles(path, names, args.qa))
        for modality in MODALITIES:
            if not any(i.modality == modality for i in items):
                hint = " (CLEAR's text-only rows are in its +tofu configs)" if args.benchmark == "clear" else ""
                raise DataError(f"{path}: no {modality} items to profile{hint}")
        out[split] = items
        if "test_set" in Path(path).name.lower():
            print(f"manu-fast: warning: --{split} {path} looks like MLLMU-Bench's Test_Set, which holds the evaluation "
                  "questions: profiling on it selects neurons on the test data", file=sys.stderr)
    shared = sorted({i.person_id for i in out["forget"]} & {i.person_id for i in out["retain"]})
    if shared and not args.allow_overlap:
        raise UsageError(f"profile: {len(shared)} people are in both --forget and --retain (IDs {', '.join(shared[:5])}"
                         f"{' ...' if len(shared) > 5 else ''}): their statistics would count on both sides; give "
                         "disjoint sets, or pass --allow-overlap if this is intended")
    return out


class _OfficialBatches:
    """Batches of benchmark items (lists of items, as ``manu_fast.official.official_batches`` draws them) encoded
    with the official code's literal prompts (``official_prompt``), right-padded, when iterated."""

    def __init__(self, processor, batches, device, dtype):
        self.processor, self.batches, self.device, self.dtype = processor, batches, device, dtype

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        from .datasets import encode_texts
        from .official import official_prompt
        image_token = getattr(self.processor, "image_token", "<image>")
        for items in self.batches:
            mm = items[0].modality == "multimodal"
            texts = [official_prompt(i.prompt, i.answer, mm).replace("<image>", image_token) for i in items]
            yield encode_texts(self.processor, texts, [i.image for i in items] if mm else None, padding_side="right",
                               device=self.device, dtype=self.dtype)


def _official_data(processor, items: dict, args, device) -> dict:
    """The official driver's data: every forget batch of a shuffled loader (reshuffled per chunk of 10 batches),
    and as many retain batches, in each modality (``--seed`` draws the shuffles)."""
    from .official import official_batches
    data = {}
    for modality in MODALITIES:
        mine = {split: [i for i in items[split] if i.modality == modality] for split in SPLITS}
        forget = official_batches(mine["forget"], args.batch_size, seed=args.seed)
        retain = official_batches(mine["retain"], args.batch_size, limit=len(forget), seed=args.seed)
        for split, batches in (("forget", forget), ("retain", retain)):
            if args.official_layers == "per-layer" and any(len(b) == 1 for b in batches):
                raise UsageError(f"profile --official-layers per-layer: a {split}/{modality} batch would hold one "
                                 f"item ({len(mine[split])} items in batches of {args.batch_size}), which has no "
                                 "std over samples (the official code gives NaN there); choose another --batch-size")
            data[(split, modality)] = _OfficialBatches(processor, batches, device, _dtype(args.dtype))
    return data


def _profile_official(args) -> None:
    from .profiler import profile
    if args.synthetic or not (args.forget and args.retain):
        raise UsageError("profile --official: give --forget and --retain (it profiles them with the official code's "
                         "literal prompts; the synthetic benchmark's are the demo's)")
    other = [flag for flag, given in (("--sites", args.sites != ["hidden"]), ("--tau", args.tau != DEFAULT_TAU),
                                      ("--towers", args.towers), ("--checkpoint", args.checkpoint),
                                      ("--resume", args.resume), ("--distributed", args.distributed),
                                      ("--on-nonfinite", args.on_nonfinite != "count")) if given]
    if other:
        raise UsageError(f"profile --official fixes its sites, threshold and data handling: {', '.join(other)} "
                         "apply to the exact statistics only")
    _check_batch_size(args.batch_size)
    items = _profile_items(args)
    processor = load_processor(args.model)
    _announce("profile --official", args.device, args.dtype)
    model = load_model(args.model, args.dtype, args.device)
    data = _official_data(processor, items, args, args.device)
    stats = profile(model, data, statistics="official", official_layers=args.official_layers,
                    progress=not args.no_progress)
    stats.save(args.out)
    batches = ", ".join(f"{k} {n}" for k, n in stats.batches.items())
    print(f"wrote {args.out}: official statistics ({args.official_layers}) of {len(stats.sources)} sources, "
          f"batches {batches}")


def cmd_profile(args) -> None:
    from .profiler import profile
    if args.official:
        return _profile_official(args)
    if args.official_layers != "as-run":
        raise UsageError("profile: --official-layers applies to --official only")
    if args.synthetic == bool(args.forget or args.retain) or bool(args.forget) != bool(args.retain):
        raise UsageError("profile: give either --synthetic or both --forget and --retain")
    if args.resume and not args.checkpoint:
        raise UsageError("profile: --resume needs --checkpoint PATH")
    _check_batch_size(args.batch_size)
    if not args.dist_timeout > 0:
        raise UsageError(f"--dist-timeout must be a positive number of minutes, got {args.dist_timeout}")
    inputs = {"MODEL_DIR": args.model, **_inputs(args, "forget", "retain", "qa", "names")}
    check_outputs("profile", {"OUT": args.out, "--checkpoint": args.checkpoint}, inputs, folders=("MODEL_DIR",))
    check_device(args.device)
    device = args.device
    if args.distributed:
        from . import distributed as mdist
        rank, world = mdist.init(timeout_s=60 * args.dist_timeout)
        if args.checkpoint:  # each rank writes its own file beside --checkpoint: checked like every output
            check_outputs("profile", {"OUT": args.out, "--checkpoint (this rank's file)":
                                      mdist.rank_path(args.checkpoint, rank, world)}, inputs, folders=("MODEL_DIR",))
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    model_dir = args.model
    # data and processor before the (maybe large) model
    benchmark = _synthetic_benchmark(model_dir) if args.synthetic else None
    items = None if args.synthetic else _profile_items(args)
    processor = None if args.synthetic else load_processor(model_dir)
    _announce("profile", device, args.dtype)
    model = load_model(model_dir, args.dtype, device)
    if args.synthetic:
        data = _synthetic_data(model, benchmark, args, device)
    else:
        data = {(split, modality): _EncodedItems(processor, [i for i in chosen if i.modality == modality],
                                                 args.batch_size, device, _dtype(args.dtype))
                for split, chosen in items.items() for modality in MODALITIES}
    if args.distributed:
        data = {key: mdist.Shard(batches) for key, batches in data.items()}
    if args.moe == "skip":
        from .adapters import patch_model
        patch_model(model, moe="skip")
    stated = {k: v for k, v in (("image", args.image_token_ids), ("video", args.video_token_ids)) if v}
    stats = profile(model, data, sites=tuple(args.sites), tau=args.tau, towers=args.towers,
                    token_kinds=stated or None, processor=processor, progress=not args.no_progress,
                    checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every, resume=args.resume,
                    on_nonfinite=args.on_nonfinite, distributed=args.distributed)
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
    check_outputs("select", {"OUT": args.out}, {"STATS": args.stats})
    if args.strategy == "manu-official":
        from .official import OfficialStats
        stats = OfficialStats.load(args.stats)
        other = [flag for flag, given in (("--per-layer", args.per_layer), ("--site", args.site != "hidden"),
                                          ("--metric", args.metric), ("--modality", args.modality),
                                          ("--token-kinds", args.token_kinds), ("--towers", args.towers)) if given]
        if other:
            raise UsageError(f"select --strategy manu-official: {', '.join(other)} do not apply (its sites, towers "
                             "and weights are the official code's)")
        masks = select_neurons(stats, "manu-official", args.alpha)
    else:
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
    check_outputs("prune", {"OUT_DIR": out}, {"MODEL_DIR": model_dir, "MASKS": args.masks}, folders=("MODEL_DIR",),
                  output_folders=("OUT_DIR",))
    check_device(args.device)
    masks = Masks.load(args.masks)  # a damaged file is refused before the model is loaded
    _announce("prune", args.device, args.dtype)
    model = load_model(args.model, args.dtype, args.device)
    check_fingerprint(fingerprint(model), masks.fingerprint, args.masks)
    prune_weights(model, masks)
    model.save_pretrained(out)
    # tokenizer / processor files and the demo's config travel with the weights; config.json was just written
    from .sources import local_files
    for f in local_files(args.model).iterdir():
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and not (out / f.name).exists() \
                and not f.name.endswith(".index.json"):
            shutil.copy2(f, out / f.name)
    print(f"wrote {out}: {masks.num_pruned()} of {masks.num_total()} {masks.site} entries zeroed")


# ---------------------------------------------------------------------------------------------------- evaluate
def _evaluation_data(args, tasks) -> dict:
    """What ``evaluate`` asks, read before the model is loaded: {"splits": {split: rows}, ...} per protocol."""
    from .datasets import load_clear_choices, load_clear_perturbed, load_mllmu_split
    from .protocols import people_of
    if args.protocol == "clear":
        return {"splits": {"forget": load_clear_perturbed(args.forget), "retain": load_clear_perturbed(args.retain)},
                "choices": {kind: load_clear_choices(path, kind)
                            for kind, path in (("real_faces", args.real_faces), ("real_world", args.real_world))
                            if path}}
    splits = {"forget": load_mllmu_split(args.forget, tasks), "retain": load_mllmu_split(args.retain, tasks)}
    if args.test:
        splits["test"] = people_of(load_mllmu_split(args.test, tasks), splits["forget"], str(args.test))
    if args.celebrity:
        splits["celebrity"] = load_mllmu_split(args.celebrity, tasks)
    data = {"splits": splits}
    if args.protocol == "mllmu":
        data["full_set"] = load_mllmu_split(args.few_shot, [t for t in tasks if t != "generation"])
    return data


# the evaluate options each protocol reads (any other given is refused, not ignored)
PROTOCOL_OPTIONS = {"few_shot": ("mllmu",), "test": ("logit", "mllmu"), "celebrity": ("logit", "mllmu"),
                    "tasks": ("mllmu",), "real_faces": ("clear",), "real_world": ("clear",),
                    "max_new_tokens": ("mllmu", "clear"), "ds_size": ("clear",), "generation_input": ("clear",)}


def _evaluation_tasks(args) -> tuple:
    """The tasks to run; arguments that do not fit the protocol are refused before anything is read."""
    from .evaluate import require_rouge
    if args.names:
        raise UsageError("evaluate: --names is not needed: MLLMU-Bench's evaluation questions name each person "
                         "themselves (profile reads --names for the text-only form of the profiling pairs)")
    for option, protocols in PROTOCOL_OPTIONS.items():
        if getattr(args, option) is not None and args.protocol not in protocols:
            raise UsageError(f"evaluate: --{option.replace('_', '-')} does not apply to --protocol {args.protocol}")
    if args.protocol == "mllmu" and not args.few_shot:
        raise UsageError("evaluate: --protocol mllmu needs --few-shot (MLLMU-Bench's Full_Set file)")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.ds_size is not None and args.ds_size < 0:
        raise UsageError(f"--ds-size must be >= 0 (0 = all rows), got {args.ds_size}")
    tasks = tuple(args.tasks or (MLLMU_TASKS if args.protocol == "mllmu" else ("classification",)))
    if args.protocol == "clear" or "generation" in tasks:
        require_rouge()
    return tasks


def _metrics_text(metrics: dict) -> str:
    parts = []
    for k, v in metrics.items():
        if k in ("n", "predictions"):
            continue
        if v is None:
            parts.append(f"{k} -")
        elif k == "accuracy":
            parts.append(f"accuracy {100 * v:.2f} %")
        else:
            parts.append(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}")
    return ", ".join(parts)


def masks_applied_line(path, masks) -> str:
    """What ``evaluate --masks`` applied: the file, how it was made and the neurons pruned per tower."""
    d = masks.description
    how = ", ".join(f"{k} {d[k]}" for k in ("strategy", "alpha") if d.get(k) is not None)
    towers = ", ".join(f"{t} {p} of {n}" for t, (p, n) in masks.by_tower().items())
    return (f"masks applied: {path} ({how + ', ' if how else ''}site {masks.site}): {masks.num_pruned()} of "
            f"{masks.num_total()} neurons pruned ({towers})")


def cmd_evaluate(args) -> None:
    from . import protocols
    from .masks import Masks, apply_masks
    _check_batch_size(args.batch_size)
    tasks = _evaluation_tasks(args)
    check_outputs("evaluate", {"--json": args.json},
                  {"MODEL_DIR": args.model, **_inputs(args, "forget", "retain", "few_shot", "test", "celebrity",
                                                      "real_faces", "real_world", "masks")}, folders=("MODEL_DIR",))
    check_device(args.device)
    data = _evaluation_data(args, tasks)
    model_dir = args.model
    masks = Masks.load(args.masks) if args.masks else None  # a damaged file is refused before the model is loaded
    processor = load_processor(model_dir)
    _announce("evaluate", args.device, args.dtype)
    model = load_model(model_dir, args.dtype, args.device)
    if masks is not None:
        apply_masks(model, masks)
        print(masks_applied_line(args.masks, masks))
    run = {"batch_size": args.batch_size, "device": args.device, "dtype": _dtype(args.dtype),
           "progress": not args.no_progress}
    report = {"model": str(model_dir), "masks": args.masks, "protocol": args.protocol, "seed": args.seed}
    if args.protocol == "logit":
        results = protocols.run_logit(model, processor, data["splits"], seed=args.seed, **run)
    elif args.protocol == "mllmu":
        results, extra = protocols.run_mllmu(model, processor, data["splits"], data["full_set"], tasks, seed=args.seed,
                                             max_new_tokens=args.max_new_tokens or protocols.MLLMU_NEW_TOKENS, **run)
        report.update(extra)
    else:
        results, extra = protocols.run_clear(
            model, processor, data["splits"], data["choices"], seed=args.seed,
            max_new_tokens=args.max_new_tokens or protocols.CLEAR_NEW_TOKENS,
            ds_size=CLEAR_DS_SIZE if args.ds_size is None else args.ds_size,
            generation_input=args.generation_input or "text", **run)
        report.update(extra)
    print(_table(["data", "task", "questions", "metrics"],
                 [[key, task, m["n"], _metrics_text(m)] for key, by_task in results.items()
                  for task, m in by_task.items()]))
    if args.protocol == "clear":
        utility = report["model_utility"]
        which = f"the first {report['ds_size']}" if report["ds_size"] else "all"
        print(f"rows scored ({which} of each task, --ds-size): "
              + ", ".join(f"{k} {used} of {total}" for k, (used, total) in report["rows"].items()))
        if utility["value"] is not None:
            print(f"CLEAR Model Utility {utility['value']:.4f}: the harmonic mean of ROUGE, Prob. and Truth Ratio of "
                  f"{', '.join(utility['tasks'])}")
    if args.json:
        Path(args.json).write_text(json.dumps({**report, "results": results}, indent=2))
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
    layers = {}  # a "linear" mask has one entry per Linear of a layer (layer::site)
    for name in masks.keep:
        layers.setdefault(masks.tower(name), set()).add(name.partition("::")[0])
    rows = [[t, len(layers[t]), p, n, f"{100 * p / n:.2f}"] for t, (p, n) in masks.by_tower().items()]
    rows.append(["total", sum(map(len, layers.values())), masks.num_pruned(), masks.num_total(),
                 f"{100 * masks.fraction():.2f}"])
    return (f"masks of model type {masks.fingerprint.get('model_type')!r}, site {masks.site!r}"
            + (f" ({what})" if what else "") + "\n" + _table(["tower", "layers", "pruned", "of", "%"], rows))


def format_stats(stats) -> str:
    from .select import natural_key
    from .schema import FIELD_INDEX
    order = ("vision", "projector", "language")
    towers, layers = {}, {}
    for key in sorted(stats.blocks, key=lambda k: (order.index(t) if (t := stats.fingerprint["layers"][k.split("::")[0]]
                                                                      .get("tower")) in order else 3, natural_key(k))):
        layer, site = key.split("::")
        tower = stats.fingerprint["layers"][layer].get("tower", "unknown")
        towers.setdefault(tower, set()).add(layer)
        layers.setdefault(tower, key)  # tokens per group: count of the tower's first block, neuron 0
    sites = sorted({k.split("::")[1] for k in stats.blocks})
    rows = [[g] + [int(stats.blocks[layers[t]][FIELD_INDEX["count"], i, 0]) for t in towers] for i, g in enumerate(stats.groups)]
    return (f"statistics of model type {stats.fingerprint.get('model_type')!r}, tau={stats.tau}, sites {', '.join(sites)}\n"
            f"layers: " + ", ".join(f"{t} {len(v)}" for t, v in towers.items()) + "\n"
            + _table(["group (tokens profiled)"] + list(towers), rows))


def format_official(stats) -> str:
    """The sources of official statistics per tower, the layers they prune and the batches profiled."""
    rows = []
    for tower in in_tower_order(i["tower"] for i in stats.sources.values()):
        mine = [i for i in stats.sources.values() if i["tower"] == tower]
        rows.append([tower, len(mine), mine[0]["pooled"], ", ".join(mine[0]["sites"]),
                     sum(len(i["targets"]) for i in mine)])
    return (f"official MANU statistics ({stats.layers}) of model type {stats.fingerprint.get('model_type')!r}; batches "
            + ", ".join(f"{k} {n}" for k, n in stats.batches.items()) + "\n"
            + _table(["tower", "sources", "layers pooled", "sites", "layers pruned"], rows))


def format_model(found) -> str:
    """Every MLP of a model per tower (``manu_fast.adapters.inspect_model``), and what is left out and why."""
    how = "inferred from the config" if found.source == "inferred" else "from MODEL_TABLE"
    roots = "; ".join(f"{t}: {', '.join(p or '(the whole model)' for p in ps)}" for t, ps in found.roots.items())
    rows = [[t, sum(i.tower == t for i in found.mlps), sum(i.neurons for i in found.mlps if i.tower == t),
             sum(i.tower == t and i.patched_as == "fused" for i in found.mlps),
             sum(i.tower == t and i.patched_as == "part" for i in found.mlps)] for t in TOWERS]
    lines = [f"model type {found.model_type!r}: towers {how} ({roots})",
             _table(["tower", "MLPs", "neurons", "fused", "parts"], rows), "", "MLPs:"]
    width = max((len(i.name) for i in found.mlps), default=0)
    for t in TOWERS:
        for i in (i for i in found.mlps if i.tower == t):
            extra = f", inside a module that also holds {', '.join(i.extra)}" if i.extra else ""
            lines.append(f"  {t:9s}  {i.name.ljust(width)}  {i.kind:7s}  {i.neurons:6d} neurons  {i.patched_as}{extra}")
    lines.append(f"left out ({len(found.skipped)}):" if found.skipped else "left out: nothing")
    lines += [f"  {s.name}: {s.reason}" for s in found.skipped]
    lines.append("fused: replaced by a fused layer if it computes the same on a probe input at patch time, else "
                 "patched by hooks; parts: patched by hooks on its Linears (manu_fast.layers.MLPPart)")
    return "\n".join(lines)


def cmd_report(args) -> None:
    from . import plots  # matplotlib is imported only when a plot is drawn
    from .masks import FORMAT as MASKS_FORMAT
    from .masks import Masks
    from .official import FORMAT as OFFICIAL_FORMAT
    from .official import OfficialStats
    from .stats import FORMAT as STATS_FORMAT
    from .stats import NeuronStats
    from .sources import is_hub_id
    path = Path(args.file)
    if path.is_dir() or is_hub_id(args.file):
        if args.plot:
            raise UsageError("report: --plot draws a statistics or masks file, not a model")
        from .adapters import inspect_model
        print(format_model(inspect_model(model_skeleton(args.file))))
        return
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            fmt = (f.metadata() or {}).get("format")
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise StatsFileError(f"{path}: not a readable safetensors file ({e})") from None
    kinds = {STATS_FORMAT: (NeuronStats.load, format_stats, plots.plot_stats),
             MASKS_FORMAT: (Masks.load, format_masks, plots.plot_masks),
             OFFICIAL_FORMAT: (OfficialStats.load, format_official, None)}
    if fmt not in kinds:
        raise StatsFileError(f"{path}: not a manu_fast statistics, official statistics or masks file (format {fmt!r})")
    load, describe, plot = kinds[fmt]
    if args.plot and plot is None:
        raise UsageError("report: --plot draws an exact statistics or a masks file; an official statistics file "
                         "has no per-neuron ratio to draw (select it with manu-official and plot the masks)")
    content = load(path)
    print(describe(content))
    if args.plot:
        print(f"wrote {plot(content, args.plot, source=path.name)}")


# ---------------------------------------------------------------------------------------------------- demo
def cmd_demo(demo_args: list[str]) -> None:
    try:
        from . import demo
    except ImportError as e:
        raise UsageError(f"demo: the demo is not available in this installation ({e})") from None
    parser = _Parser(prog="manu-fast demo", description=(demo.__doc__ or "").splitlines()[0], epilog=demo.EPILOG)
    demo.add_arguments(parser)
    args = parser.parse_args(demo_args)
    check_outputs("demo", {"--out": args.out, "--cache-dir": args.cache_dir}, {},
                  output_folders=("--out", "--cache-dir"))
    _announce("demo", "cpu", "float32")  # the tiny LLaVA trains and runs in float32 on CPU
    demo.main(args)


# ---------------------------------------------------------------------------------------------------- parser
class _VersionAction(argparse.Action):
    """--version: imports torch, so it runs only when asked (not while the parser is built)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def version_text() -> str:
    """``manu-fast --version``: the versions that matter and, per device, which backend runs."""
    import torch
    from .install import source_checkout, version
    from .ops import describe_backend
    checkout = source_checkout()
    lines = [f"manu-fast {version('manu_fast')}" + (f" (source checkout {checkout})" if checkout else ""),
             f"torch {torch.__version__}, transformers {version('transformers')}, triton {version('triton')}, "
             f"safetensors {version('safetensors')}",
             f"cpu:  {describe_backend(torch.device('cpu'))}"]
    if torch.cuda.is_available():
        lines += [f"cuda:{i} ({torch.cuda.get_device_name(i)}): {describe_backend(torch.device('cuda', i))}"
                  for i in range(torch.cuda.device_count())]
    else:
        built = f"torch built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only torch build"
        lines.append(f"cuda: no CUDA device ({built})")
    interp = "on" if os.environ.get("TRITON_INTERPRET") == "1" else "off"
    lines.append(f"Triton interpreter (TRITON_INTERPRET=1, runs the Triton kernels on CPU tensors for tests): {interp}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="manu-fast", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--version", action=_VersionAction,
                   help="print the versions of manu-fast, torch, transformers and triton and which backend runs on "
                        "each device, then exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    dev = argparse.ArgumentParser(add_help=False)
    dev.add_argument("--device", default="cpu", help="torch device to run the model on (default: %(default)s)")
    dev.add_argument("--dtype", default="float32", choices=DTYPE_NAMES,
                     help="dtype to load the model in (default: %(default)s)")

    s = sub.add_parser("profile", parents=[dev], help="gather per-neuron statistics of a model over forget/retain data",
                       description="Run MODEL over forget and retain data, multimodal and text-only, and write the "
                                   "per-neuron statistics of every MLP to OUT (safetensors).")
    s.add_argument("model", help=MODEL_HELP)
    s.add_argument("out", help="statistics file to write (.safetensors)")
    s.add_argument("--synthetic", action="store_true",
                   help="profile on the embedded synthetic benchmark (MODEL must be a model trained by `manu-fast demo`)")
    s.add_argument("--forget", help="forget-set parquet file or folder (with --retain): MLLMU-Bench: a MANU-style "
                                    "file (image, ID, metadata) or, with --qa, a split such as forget_5; CLEAR: a "
                                    "+tofu config such as forget10+tofu")
    s.add_argument("--retain", help="retain-set parquet file or folder (with --forget), e.g. retain_95 or "
                                    "retain90+tofu")
    s.add_argument("--benchmark", default="mllmu", choices=BENCHMARKS,
                   help="how --forget/--retain are read (default: %(default)s)")
    s.add_argument("--qa", help="mllmu: the question-answer file profiled for the people of --forget/--retain "
                                "(ID, metadata), e.g. MLLMU-Bench's ft_Data; their images come from --forget/--retain")
    s.add_argument("--names", help="mllmu: JSON object {ID: name} for the text-only questions, over the names in the "
                                   "data (name column, JSON biography, the profile's own name question)")
    s.add_argument("--seed", type=int, default=0,
                   help="clear: seed of the caption question asked for each image (default: %(default)s)")
    s.add_argument("--forget-percent", type=float, default=10.0,
                   help="--synthetic: percentage of the people to forget (default: %(default)s)")
    s.add_argument("--profile-positions", default="question", choices=PROFILE_MODES,
                   help="--synthetic: token positions profiled in the language model (default: %(default)s)")
    s.add_argument("--batch-size", type=int, default=64, help="questions per batch (default: %(default)s)")
    s.add_argument("--sites", nargs="+", default=["hidden"], choices=SITES,
                   help="what to profile: hidden = MLP neuron h (default); pre/up = gate(fc1)/up_proj outputs "
                        "(the official code's convention); out = MLP output")
    s.add_argument("--tau", type=float, default=DEFAULT_TAU, help="activity threshold of the frequency metric (default: %(default)s)")
    s.add_argument("--towers", nargs="+", choices=TOWERS,
                   help="profile only these towers (default: all)")
    s.add_argument("--image-token-ids", nargs="+", type=int, metavar="ID",
                   help="language-model token ids of image positions (default: those the config and processor "
                        "name, e.g. image_token_id, vision_config.image_token_id, image_patch_id)")
    s.add_argument("--video-token-ids", nargs="+", type=int, metavar="ID",
                   help="language-model token ids of video positions (default: those the config and processor name)")
    s.add_argument("--moe", default="refuse", choices=MOE_POLICIES,
                   help="mixture-of-experts layers: refuse the model (default) or profile every other MLP")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.add_argument("--checkpoint", help="write the statistics so far to this file every --checkpoint-every batches "
                                        "(atomic), so that a killed run can continue with --resume")
    s.add_argument("--checkpoint-every", type=int, default=50, help="batches between checkpoints (default: %(default)s)")
    s.add_argument("--resume", action="store_true",
                   help="continue from --checkpoint if it exists (batches already in it are skipped, not re-counted)")
    s.add_argument("--on-nonfinite", default="count", choices=NONFINITE_POLICIES,
                   help="NaN/Inf activations: count and exclude them (default), or stop with an error naming the layer")
    s.add_argument("--allow-overlap", action="store_true",
                   help="profile even when the same people (IDs) are in both --forget and --retain (refused by default)")
    s.add_argument("--dist-timeout", type=float, default=30.0,
                   help="--distributed: minutes a collective waits for a stalled or dead rank before every rank stops "
                        "with an error (default: %(default)s)")
    s.add_argument("--official", action="store_true",
                   help="gather the official MANU code's statistics instead (for `select --strategy manu-official`): "
                        "its literal prompts 'USER: <image>\\n{q}\\nASSISTANT: {a}' / 'USER:{q}\\nASSISTANT: {a}', "
                        "every forget batch and as many retain batches, shuffled with --seed; Linear outputs, "
                        "padding included (docs/SELECTION.md, manu-official)")
    s.add_argument("--official-layers", default="as-run", choices=OFFICIAL_LAYERS,
                   help="with --official: as-run pools every layer of a tower and prunes its last three, as the code "
                        "runs; per-layer scores and prunes every layer on its own (default: %(default)s)")
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
                   help="manu-code: the official score formula on exact token statistics, per layer (image towers on "
                        "multimodal, language model on text-only data), top alpha %% per tower; manu-official: the "
                        "official code's selection as it runs, from `profile --official` statistics (one alpha); "
                        "power-ratio: this project's, forget/retain mean a^2 "
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
    s.add_argument("--token-kinds", nargs="+", choices=TOKEN_KINDS,
                   help="pool only these token kinds of each (split, modality), e.g. text: the language model's "
                        "text positions, not its image-token positions (default: all)")
    s.add_argument("--towers", nargs="+", choices=TOWERS,
                   help="score only these towers (default: every tower the strategy's data reaches)")
    s.add_argument("--seed", type=int, default=0, help="random: the seed (default: %(default)s)")
    s.set_defaults(func=cmd_select)

    s = sub.add_parser("prune", parents=[dev], help="zero the selected neurons' weights and save the pruned model",
                       description="Permanently zero the weights of the neurons pruned by MASKS in MODEL and save the "
                                   "result to OUT_DIR; it loads with stock transformers (from_pretrained).")
    s.add_argument("model", help=MODEL_HELP)
    s.add_argument("masks", help="masks file written by `manu-fast select`")
    s.add_argument("out", help="folder to write the pruned model to (must differ from MODEL)")
    s.set_defaults(func=cmd_prune)

    s = sub.add_parser("evaluate", parents=[dev], help="MLLMU-Bench or CLEAR evaluation, per split and modality",
                       description="Evaluate MODEL (optionally with MASKS applied) on MLLMU-Bench or CLEAR files and "
                                   "print the metrics per split, modality and task. Protocols: logit = our zero-shot "
                                   "multiple choice by option-letter logits (classification only); mllmu = "
                                   "MLLMU-Bench's eval.py (few-shot classification read from the first generated "
                                   "letter, cloze, generation ROUGE); clear = CLEAR's eval (captions and face "
                                   "recognition: ROUGE, probability, truth ratio; real_faces / real_world multiple "
                                   "choice). See manu_fast/protocols.py.")
    s.add_argument("model", help=MODEL_HELP + "; with its processor")
    s.add_argument("--forget", required=True, help="forget split: MLLMU-Bench forget_5/10/15, or CLEAR "
                                                   "forget01/05/10_perturbed (parquet file or folder)")
    s.add_argument("--retain", required=True, help="retain split: MLLMU-Bench retain_95/90/85, or CLEAR "
                                                   "retain_perturbed")
    s.add_argument("--protocol", default="logit", choices=PROTOCOLS,
                   help="how to ask and score (default: %(default)s)")
    s.add_argument("--few-shot", help="mllmu: MLLMU-Bench's Full_Set, where the few-shot examples come from")
    s.add_argument("--test", help="logit/mllmu: MLLMU-Bench's Test_Set (file or folder); its rows of the forget people "
                                  "are evaluated")
    s.add_argument("--celebrity", help="logit/mllmu: MLLMU-Bench's Retain_Set (real celebrities)")
    s.add_argument("--tasks", nargs="+", choices=MLLMU_TASKS,
                   help="mllmu: tasks to run (default: all three; logit runs classification only)")
    s.add_argument("--real-faces", help="clear: CLEAR's real_faces file")
    s.add_argument("--real-world", help="clear: CLEAR's real_world file")
    s.add_argument("--seed", type=int, default=0,
                   help="seed of the benchmarks' random choices: few-shot people, the Test_Set rendering, CLEAR's "
                        "caption question (default: %(default)s)")
    s.add_argument("--max-new-tokens", type=int,
                   help="tokens generated per reply (default: 50 for mllmu as eval.py, 300 for clear as eval.yaml)")
    s.add_argument("--ds-size", type=int, metavar="N",
                   help=f"clear: score the first N rows of each task, 0 = all (default: {CLEAR_DS_SIZE}, eval.yaml's "
                        f"ds_size)")
    s.add_argument("--generation-input", choices=GENERATION_INPUTS,
                   help="clear: replies generated from CLEAR's decoded text prompt, without the image (text, the "
                        "default, as eval.py), or from the chat-template prompt with the image (image)")
    s.add_argument("--masks", help="masks file written by `manu-fast select`, applied (reversibly) before evaluating")
    s.add_argument("--names", help=argparse.SUPPRESS)  # profile's option, refused with the reason (see _evaluation_tasks)
    s.add_argument("--batch-size", type=int, default=16, help="questions per batch (default: %(default)s)")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.add_argument("--json", help="also write the results (with every reply) to this JSON file")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("report", help="summarise a statistics or masks file, or a model's MLPs",
                       description="Print a summary of a statistics file (layers per tower, groups, tokens profiled), "
                                   "a masks file (how it was made, pruned neurons per tower), or a model folder (every "
                                   "MLP found per tower, how it is patched, and what is left out and why; built from "
                                   "config.json on the meta device, no weights read).")
    s.add_argument("file", help="a .safetensors statistics or masks file, or a model (folder or hub id)")
    s.add_argument("--plot", help="also draw the file to this .png/.pdf/.svg: a masks file's pruned neurons per layer "
                                  "and tower, a statistics file's forget/retain activation ratio of the neurons per "
                                  "layer (needs matplotlib: the eval extra)")
    s.set_defaults(func=cmd_report)

    # listed for --help only: main() hands `demo ...` to the demo's own parser (imported lazily)
    sub.add_parser("demo", help="the whole pipeline on the embedded benchmark (see `manu-fast demo --help`)")
    return p


EXIT_INTERNAL = 1


def expected_errors() -> tuple[type[BaseException], ...]:
    """The errors a user can cause or meet (bad input, a refused file, a full disk, a missing package, no GPU memory):
    one line and exit status 2. The libraries' own types are added once they are imported."""
    found = [UsageError, StatsFileError, FileNotFoundError, ValueError, OSError, ImportError, MemoryError]
    for module, name in (("safetensors", "SafetensorError"), ("PIL.Image", "DecompressionBombError"),
                         ("torch", "OutOfMemoryError"), ("torch.distributed", "DistError"),
                         ("manu_fast.distributed", "DistributedError"),
                         ("manu_fast.profiler", "NonFiniteActivationError")):
        if module in sys.modules and hasattr(sys.modules[module], name):
            found.append(getattr(sys.modules[module], name))
    return tuple(found)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["demo"]:
            cmd_demo(argv[1:])
        else:
            args = build_parser().parse_args(argv)
            args.func(args)
    except Exception as e:  # noqa: BLE001 - sorted into expected (one line) and internal (traceback) below
        if not isinstance(e, expected_errors()):
            import traceback
            traceback.print_exc()
            print(f"manu-fast: internal error ({type(e).__name__}): this is a bug in manu_fast or a library it uses; "
                  "please report it with the command line and the traceback above", file=sys.stderr)
            return EXIT_INTERNAL
        message = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the library wrote
        print(f"manu-fast: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("manu-fast: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
