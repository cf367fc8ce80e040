"""One world's experiment (profile, select with each method, prune, evaluate) and the worlds of a run, each in
its own process started with the recipe's fixed numerics (``recipe.NUMERIC_ENV``)."""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..evaluate import evaluate
from ..pipeline import calibrate_budget, drop_points
from ..schema import MODALITIES, PROFILE_MODES, SPLITS
from ..synthetic import (EVAL_TEMPLATES, EVAL_VARIANT, PROFILE_TEMPLATES, PROFILE_VARIANT, SyntheticProfiles,
                         num_image_tokens)
from .options import option
from .recipe import ModelConfig, fixed_numerics, load_or_train, weights_digest

OURS = "power-ratio"
DEFAULT_METHOD = "manu-code"
# select_neurons arguments of each selection method; "random" (the control) is not here: it copies another
# method's neuron counts per layer. A new method is one entry.
METHOD_SELECT = {"manu-code": {"strategy": "manu-code"},
                 "manu-paper": {"strategy": "manu-paper"},
                 "selective-pruning": {"strategy": "selective-pruning", "modality": "text"},
                 "multimodal-only": {"strategy": "selective-pruning", "modality": "multimodal"},
                 OURS: {"strategy": OURS}}
# the official code's selection (manu_fast.official): method -> official_layers; single-shot, one percentage for
# both towers (the official prune_percent), never calibrated; opt-in (--methods), not in the default table
OFFICIAL = {"manu-official": "as-run", "manu-official-per-layer": "per-layer"}
METHODS = (*METHOD_SELECT, *OFFICIAL, "random")
DEFAULT_METHODS = tuple(m for m in METHODS if m not in OFFICIAL)
EXPERIMENTAL = ("manu-paper",)
SCHEDULES = ("single-shot", "iterative")
# Iterative rounds (re-profiling the pruned model) never did better than one shot on this model (docs/SELECTION.md)
DEFAULT_SCHEDULE = "single-shot"


@dataclass(frozen=True)
class ExperimentConfig:
    """What is pruned and how, in one world: methods x fractions x schedules at fixed budgets (the MANU protocol),
    plus per-layer budgets chosen on the profiling questions for the methods in ``calibrated`` (docs/SELECTION.md
    says how each default was chosen)."""

    forget_percent: float = option(10.0, "forget split, %% of the people (at least one person)")
    methods: tuple[str, ...] = option(DEFAULT_METHODS, "selection methods (random: the control of manu-code, of the "
                                      "manu-official rows and of each calibrated method; manu-official and "
                                      "manu-official-per-layer: the official code's selection, opt-in)",
                                      choices=METHODS)
    alphas: tuple[float, ...] = option((15.0, 30.0, 45.0), "fixed pruning fractions, %% of the language model's "
                                       "neurons (the image towers: see --image-tower-ratio)")
    default_alpha: float = option(30.0, "the fraction manu-code's headline line reads (one of --alphas)")
    image_tower_ratio: float = option(1 / 3, "vision tower and projector prune this share of alpha")
    schedules: tuple[str, ...] = option((DEFAULT_SCHEDULE,), "single-shot, and/or iterative: --rounds rounds of "
                                        "profile -> select -> mask", choices=SCHEDULES)
    iterative_rounds: int = option(2, "rounds of iterative pruning", flag="--rounds")
    profile_positions: str = option("all", "language-model positions profiled for the fixed-alpha rows",
                                    choices=PROFILE_MODES)
    per_layer: bool = option(False, "fixed-alpha rows: top-k per layer instead of per tower")
    calibrated: tuple[str, ...] = option((OURS, DEFAULT_METHOD), "methods that also get per-layer budgets chosen on "
                                         "the profiling questions (nothing after the flag: none)",
                                         choices=tuple(METHOD_SELECT), nargs="*")
    calibrated_positions: str = option("question", "language-model positions profiled for the calibrated rows",
                                       choices=PROFILE_MODES)
    first_layer_budgets: tuple[float, ...] = option((0.0, 10.0), "calibration grid: %% of the first language-model "
                                                    "layer")
    later_layer_budgets: tuple[float, ...] = option((30.0, 40.0, 50.0, 60.0, 70.0), "calibration grid: %% of each "
                                                    "later language-model layer")
    image_budgets: tuple[float, ...] = option((0.0, 10.0, 20.0), "calibration grid: %% of the vision tower and of "
                                              "the projector")
    retain_limit: float = option(4.0, "calibration: largest retain drop (points, in each modality) allowed on the "
                                 "profiling questions (a margin under the 5-point target)")
    seed: int = 0


@dataclass(frozen=True)
class RunConfig:
    """Which worlds run, where, and when a world counts as learned."""

    seeds: tuple[int, ...] = option((0, 1), "one independent world per seed: people, forget split and model (two, so "
                                    "that a cold `make demo` stays under 3 minutes on 2 cores; README: more seeds and shapes)")
    jobs: int | None = option(None, "worlds run in parallel, one single-threaded process each (the numbers do not "
                              "depend on it; default: the CPUs this process may use, at most one per seed)", type=int)
    out: str = option("runs/demo", "folder for report.json and plot.png")
    cache_dir: str | None = option(None, "trained-model cache (default: $MANU_FAST_CACHE or ~/.cache/manu_fast)",
                                   type=str)
    learned_line: float = option(90.0, "a world is learned when its unpruned model answers at least this %% of the "
                                 "profiling questions in every split and modality; below it, it is retrained with "
                                 "twice the steps (up to --max-train-steps), then flagged and left out of the verdicts")
    max_train_steps: int = option(1600, "most training steps a world is retrained with to reach --learned-line")
    no_progress: bool = option(False, "no progress bars")


def question_sets(data: SyntheticProfiles, model, forget_percent: float, profile_positions: str,
                  batch_size: int = 128) -> tuple[dict, dict]:
    """(profiling batches, evaluation batches), each {(split, modality): [Batch]}, on disjoint phrasings and
    face renderings; profiling batches carry a ``profile_mask`` for ``profile_positions``."""
    if profile_positions not in PROFILE_MODES:
        raise ValueError(f"profile_positions must be one of {PROFILE_MODES}, got {profile_positions!r}")
    image_tokens = num_image_tokens(model.config)
    people = dict(zip(SPLITS, data.split(forget_percent)))
    profiling, evaluation = {}, {}
    for split in SPLITS:
        for modality in MODALITIES:
            profiling[split, modality] = data.batches(
                data.questions(people[split], PROFILE_TEMPLATES), modality, image_tokens, batch_size,
                variant=PROFILE_VARIANT, profile=profile_positions)
            evaluation[split, modality] = data.batches(
                data.questions(people[split], EVAL_TEMPLATES), modality, image_tokens, batch_size,
                variant=EVAL_VARIANT)
    return profiling, evaluation


def _select_kwargs(method: str, per_layer: bool) -> dict:
    if method not in METHOD_SELECT:
        raise ValueError(f"unknown method {method!r}; expected one of {tuple(METHOD_SELECT)}")
    return {**METHOD_SELECT[method], "per_layer": per_layer}


def _row(method, alpha, schedule, masks, metrics, baseline, like=None) -> dict:
    row = {"method": method, "like": like, "alpha": alpha, "schedule": schedule, "pruned": masks.num_pruned(),
           "pruned_by_tower": {t: n for t, (n, _) in masks.by_tower().items()}, "metrics": metrics}
    row["drop"] = drop_points(metrics, baseline)
    return row


def tower_alphas(exp: ExperimentConfig, alpha: float) -> dict[str, float]:
    """Per-tower pruning percentages for a language-model fraction ``alpha`` (see ExperimentConfig)."""
    image = alpha * exp.image_tower_ratio
    return {"vision": image, "projector": image, "language": alpha}


def budget_candidates(fingerprint: dict, exp: ExperimentConfig) -> list[dict]:
    """The calibration grid: one ``select_neurons`` alpha mapping per (first language-model layer, each later
    language-model layer, image towers) budget of ExperimentConfig; zero budgets prune nothing there."""
    from ..select import natural_key
    layers = fingerprint["layers"]
    language = sorted((n for n, info in layers.items() if info.get("tower") == "language"), key=natural_key)
    image = [t for t in ("vision", "projector") if any(info.get("tower") == t for info in layers.values())]
    if not language:
        raise ValueError("calibrated budgets need a language model among the profiled layers")
    out = []
    for first, later, img in itertools.product(exp.first_layer_budgets, exp.later_layer_budgets, exp.image_budgets):
        alpha = {**({language[0]: first} if first else {}), **{n: later for n in language[1:] if later},
                 **{t: img for t in image if img}}
        if alpha:
            out.append(alpha)
    return out


def check_experiment(exp: ExperimentConfig) -> None:
    """One-line ValueError for an experiment that cannot run (before any training)."""
    unknown = [m for m in exp.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; expected among {METHODS}")
    bad = [m for m in exp.calibrated if m not in exp.methods or m == "random" or m in OFFICIAL]
    if bad:
        raise ValueError(f"calibrated methods {bad} must be among the methods run ({exp.methods}), random and the "
                         "official code's selection (one percentage) excluded")
    bad = [s for s in exp.schedules if s not in SCHEDULES]
    if bad or not exp.schedules:
        raise ValueError(f"schedules must be among {SCHEDULES}, got {list(exp.schedules)}")
    if exp.iterative_rounds < 1:
        raise ValueError(f"iterative_rounds must be >= 1, got {exp.iterative_rounds}")
    if exp.default_alpha not in exp.alphas:
        raise ValueError(f"default_alpha {exp.default_alpha} is not among the alphas {list(exp.alphas)}")
    if not 0 < exp.forget_percent < 100:
        raise ValueError(f"forget_percent must be in (0, 100), got {exp.forget_percent}")


def check_run(run: RunConfig, model: ModelConfig) -> None:
    """One-line ValueError for worlds that cannot be built."""
    if not run.seeds or len(set(run.seeds)) != len(run.seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {list(run.seeds)}")
    if run.jobs is not None and run.jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {run.jobs}")
    if not 0 <= run.learned_line <= 100:
        raise ValueError(f"learned_line must be a percentage in [0, 100], got {run.learned_line}")
    if model.num_people < 2 or model.train_steps < 1 or model.text_intermediate < 1:
        raise ValueError(f"a world needs at least 2 people, 1 training step and 1 neuron per layer, got "
                         f"{model.num_people}, {model.train_steps}, {model.text_intermediate}")


def official_inputs(inputs: dict, seed: int) -> dict:
    """The official driver's data from the profiling batches: every forget batch, and as many retain batches of each
    modality, drawn at random (seeded); the official statistics take every position (profile_mask is not used)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    out = {}
    for (split, modality), batches in inputs.items():
        if split == "retain":
            order = torch.randperm(len(batches), generator=g)[:len(inputs[("forget", modality)])].tolist()
            batches = [batches[i] for i in order]
        out[split, modality] = batches
    return out


def run_experiment(model, data: SyntheticProfiles, exp: ExperimentConfig, progress: bool = True) -> dict:
    """Profile, select, prune and evaluate one world: every (method, alpha, schedule) at fixed budgets, then the
    calibrated budgets; returns the world's report dict (rows of reported-question accuracies)."""
    from ..masks import apply_masks, remove_masks
    from ..pipeline import iterative_prune
    from ..profiler import profile
    from ..select import random_like, select_neurons

    check_experiment(exp)
    positions = [exp.profile_positions] + ([exp.calibrated_positions] if exp.calibrated else [])
    profiling = {pos: question_sets(data, model, exp.forget_percent, pos)[0] for pos in dict.fromkeys(positions)}
    evaluation = question_sets(data, model, exp.forget_percent, exp.profile_positions)[1]
    inputs = {pos: {key: [b.inputs for b in batches] for key, batches in sets.items()} for pos, sets in profiling.items()}
    baseline = evaluate(model, evaluation)
    t0 = time.perf_counter()
    stats = {pos: profile(model, inputs[pos], progress=progress) for pos in inputs}
    profile_seconds = time.perf_counter() - t0
    official = {m: profile(model, official_inputs(inputs[exp.profile_positions], exp.seed), statistics="official",
                           official_layers=layers, progress=progress) for m, layers in OFFICIAL.items() if m in exp.methods}

    rows = []

    def report(row_method, alpha, schedule, masks, like=None):
        apply_masks(model, masks, "demo")
        try:
            rows.append(_row(row_method, alpha, schedule, masks, evaluate(model, evaluation), baseline, like))
        finally:
            remove_masks(model, "demo")
        return rows[-1]

    chosen = [m for m in exp.methods if m != "random"]
    runs = [(m, a, s) for a in exp.alphas for s in exp.schedules for m in chosen]
    for method, alpha, schedule in tqdm(runs, desc="prune + evaluate", disable=not progress, leave=False):
        if method in OFFICIAL:
            if schedule == "single-shot":
                masks = select_neurons(official[method], "manu-official", alpha=alpha)
                report(method, alpha, schedule, masks)
                if "random" in exp.methods:
                    report("random", alpha, schedule, random_like(masks, seed=exp.seed, per_layer=True), like=method)
            continue
        kwargs = _select_kwargs(method, exp.per_layer)
        if schedule == "single-shot":
            masks = select_neurons(stats[exp.profile_positions], alpha=tower_alphas(exp, alpha), seed=exp.seed, **kwargs)
        else:
            masks = iterative_prune(model, inputs[exp.profile_positions], exp.iterative_rounds,
                                    alpha_per_round=tower_alphas(exp, alpha / exp.iterative_rounds),
                                    mask_name="demo", seed=exp.seed, profile_kwargs={"progress": False}, **kwargs)
            remove_masks(model, "demo")
        report(method, alpha, schedule, masks)
        if method == DEFAULT_METHOD and "random" in exp.methods:
            report("random", alpha, schedule, random_like(masks, seed=exp.seed, per_layer=True), like=method)
    for method in exp.calibrated:
        kwargs = _select_kwargs(method, exp.per_layer)
        st = stats[exp.calibrated_positions]
        budget = calibrate_budget(model, st, kwargs, budget_candidates(st.fingerprint, exp),
                                  profiling[exp.calibrated_positions], exp.retain_limit, progress)
        masks = select_neurons(st, alpha=budget["alpha"], **kwargs)
        report(method, "calibrated", "single-shot", masks).update(budget=budget)
        if "random" in exp.methods:
            report("random", "calibrated", "single-shot", random_like(masks, seed=exp.seed, per_layer=True),
                   like=method)
    return {"experiment": dataclasses.asdict(exp), "baseline": baseline, "rows": rows,
            "profile_seconds": profile_seconds, "groups": {pos: st.groups for pos, st in stats.items()},
            "num_questions": {f"{s}/{m}": sum(len(b.questions) for b in v) for (s, m), v in evaluation.items()}}


# ---------------------------------------------------------------------------------------------------- worlds
@contextlib.contextmanager
def _quiet_transformers():
    """No transformers progress bars (weight loading and saving) inside the block."""
    from transformers.utils import logging as hf_logging
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def learned_accuracy(model, data: SyntheticProfiles, forget_percent: float) -> dict:
    """Unpruned accuracy (%) per split/modality on the profiling questions: what decides whether a world was
    learned (the reported questions never decide anything)."""
    profiling, _ = question_sets(data, model, forget_percent, "answer")
    return {k: 100 * v["accuracy"] for k, v in evaluate(model, profiling).items()}


def train_until_learned(mcfg: ModelConfig, forget_percent: float, run: RunConfig, progress: bool):
    """(model, data, learning record): the world's model, retrained with twice the steps while its profiling
    accuracy is below ``run.learned_line`` in some split/modality and the steps stay within ``run.max_train_steps``."""
    attempts = []
    while True:
        model, data, training = load_or_train(mcfg, Path(run.cache_dir) if run.cache_dir else None, progress)
        accuracy = learned_accuracy(model, data, forget_percent)
        attempts.append({"train_steps": mcfg.train_steps, **training, "profiling_accuracy": accuracy})
        learned = min(accuracy.values()) >= run.learned_line
        if learned or 2 * mcfg.train_steps > run.max_train_steps:
            return model, data, mcfg, {"learned": learned, "line": run.learned_line, "attempts": attempts}
        mcfg = dataclasses.replace(mcfg, train_steps=2 * mcfg.train_steps)


def run_world(seed: int, model_options: dict, experiment_options: dict, run: RunConfig, progress: bool = True) -> dict:
    """One world (people, split, model) for ``seed``: train (until learned) or load the model, run the experiment;
    returns its report. Runs in a process started with the recipe's numerics (``run_worlds`` starts it)."""
    t0 = time.perf_counter()
    with fixed_numerics(), _quiet_transformers():
        exp = ExperimentConfig(**experiment_options, seed=seed)
        model, data, mcfg, learning = train_until_learned(ModelConfig(**model_options, seed=seed), exp.forget_percent,
                                                          run, progress)
        train_seconds = time.perf_counter() - t0
        digest = weights_digest(model)
        report = run_experiment(model, data, exp, progress)
    report.update(seed=seed, model=dataclasses.asdict(mcfg), model_key=mcfg.key(), weights_sha256=digest,
                  learning=learning, trained_now=sum(a["trained_now"] for a in learning["attempts"]),
                  train_or_load_seconds=train_seconds, seconds=time.perf_counter() - t0)
    return report


def run_worlds(model_options: dict, experiment_options: dict, run: RunConfig) -> list[dict]:
    """``run_world`` for every seed of ``run``, in order, each in a spawned process started with the recipe's
    numerics (``run.jobs`` at a time, default as many as usable CPUs): the same numbers whatever the jobs."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from .recipe import numeric_env
    check_run(run, ModelConfig(**model_options))
    seeds = list(run.seeds)
    jobs = min(run.jobs or usable_cpus(), len(seeds))
    progress = not run.no_progress
    # the variables must be in place when the workers start (they are read when torch loads); all are started
    # by the submits below
    with numeric_env(), ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_world, s, model_options, experiment_options, run, progress and jobs == 1)
                   for s in seeds]
        for done in tqdm(as_completed(futures), total=len(futures), disable=not progress or jobs == 1,
                         desc=f"{len(seeds)} seeds in {jobs} processes (train + prune + evaluate)"):
            done.result()  # a failed world stops the run here, with its traceback
        return [f.result() for f in futures]


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
