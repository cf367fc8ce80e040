"""One world's experiment (profile, select with each method, prune, evaluate) and the worlds of a run, each in
its own process started with the recipe's fixed numerics (``recipe.NUMERIC_ENV``)."""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import time
from pathlib import Path

from tqdm.auto import tqdm

from ..evaluate import evaluate
from ..pipeline import calibrate_budget, drop_points
from ..schema import MODALITIES, PROFILE_MODES, SPLITS
from ..synthetic import (EVAL_TEMPLATES, EVAL_VARIANT, PROFILE_TEMPLATES, PROFILE_VARIANT, SyntheticProfiles,
                         num_image_tokens)
from .config import (DEFAULT_METHOD, METHOD_SELECT, METHODS, OFFICIAL, SCHEDULES, ExperimentConfig, ModelConfig,
                     RunConfig)
from .recipe import fixed_numerics, load_or_train, weights_digest

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
