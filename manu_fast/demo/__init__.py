"""``manu-fast demo``: the whole MANU pipeline on an embedded benchmark, with no downloads, over several seeds.

Each seed is an independent world: its own fictitious people, forget split and model. Per seed:

1. Build a tiny LLaVA (the real ``LlavaForConditionalGeneration``: a tiny CLIP vision tower, a tiny Llama) and
   train it on CPU to answer the synthetic profiles' questions (``synthetic.SyntheticProfiles``) in both
   modalities, in a process with fixed numerics (``recipe.NUMERIC_ENV``: one thread, baseline x86-64 kernels, MKL's
   reproducible path), so every x86-64 machine trains the same weights bit for bit; the model is cached on disk,
   keyed by its configuration, the recipe's code and the versions. A world whose unpruned model answers fewer than
   ``--learned-line`` % of the profiling questions is retrained longer, then flagged and not judged.
2. Profile it with the fused layers on the *profiling* questions (phrasings and face renderings that are never
   reported), select neurons with each method, prune them with reversible masks over a range of pruning fractions;
   calibrated methods also get per-layer budgets chosen on the profiling questions.
3. Report forget / retain accuracy and the mean probability of the right answer in each modality on the
   *evaluation* questions, each method next to a random control of the same neuron counts.

Over the seeds every row is reported as mean ± sd (sample standard deviation): a terminal table,
``report.json`` (with every seed's rows) and ``plot.png`` (drops per method and modality, targets shaded). Worlds run as one-thread processes
(``--jobs`` at a time), so the numbers do not depend on the number of cores or the machine's load.

Modules: ``config`` (methods and the config dataclasses, torch-free), ``recipe`` (model, training, numerics, cache), ``experiment`` (one world's protocol; the worlds of a run),
``summary`` (mean ± sd, targets, table, plot), ``cli`` (the options, generated from the config dataclasses).
Methods: ``experiment.METHOD_SELECT`` (docs/SELECTION.md), the official code's selection ``experiment.OFFICIAL``
(opt-in) and ``random``, the control.
"""
from .. import lazy_attributes

# name -> submodule, loaded on first use: `manu-fast demo --help` (cli, config, options) imports no torch
_LAZY = {
    "CACHE_ENV": "recipe", "CACHE_FORMAT": "recipe", "DEFAULT_METHOD": "config", "DEFAULT_METHODS": "config",
    "DEFAULT_SCHEDULE": "config", "DEMO_CONFIG": "recipe", "EPILOG": "cli", "EXPERIMENTAL": "config",
    "ExperimentConfig": "config", "METHODS": "config", "METHOD_SELECT": "config", "ModelConfig": "config",
    "NUMERIC_ENV": "recipe", "OFFICIAL": "config", "OURS": "config", "RunConfig": "config",
    "SCHEDULES": "config", "TARGETS": "summary", "acceptance": "summary", "add_arguments": "cli",
    "benchmark": "recipe", "budget_candidates": "experiment", "build_tiny_llava": "recipe", "check_experiment": "experiment",
    "check_run": "experiment", "default_cache_dir": "recipe", "exec_with_numeric_env": "recipe", "fixed_numerics": "recipe",
    "format_acceptance": "summary", "format_learning": "summary", "format_table": "summary", "headline_rows": "summary",
    "learned_accuracy": "experiment", "load_or_train": "recipe", "main": "cli", "numeric_env": "recipe",
    "official_inputs": "experiment", "parser": "cli", "plot_report": "summary", "question_sets": "experiment",
    "recipe_version": "recipe", "run_experiment": "experiment", "run_world": "experiment", "run_worlds": "experiment",
    "summarize": "summary", "tower_alphas": "experiment", "train_tiny_llava": "recipe", "train_until_learned": "experiment",
    "weights_digest": "recipe",
}


__all__ = sorted(_LAZY)
__getattr__ = lazy_attributes(__name__, _LAZY)
