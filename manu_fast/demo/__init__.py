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

Modules: ``recipe`` (model, training, numerics, cache), ``experiment`` (one world's protocol; the worlds of a run),
``summary`` (mean ± sd, targets, table, plot), ``cli`` (the options, generated from the config dataclasses).
Methods: ``experiment.METHOD_SELECT`` (docs/SELECTION.md), the official code's selection ``experiment.OFFICIAL``
(opt-in) and ``random``, the control.
"""
from .cli import EPILOG, add_arguments, main, parser
from .experiment import (DEFAULT_METHOD, DEFAULT_METHODS, DEFAULT_SCHEDULE, EXPERIMENTAL, METHOD_SELECT, METHODS,
                         OFFICIAL, OURS, SCHEDULES, official_inputs,
                         ExperimentConfig, RunConfig, budget_candidates, check_experiment, check_run,
                         learned_accuracy, question_sets, run_experiment, run_world, run_worlds, tower_alphas,
                         train_until_learned)
from .recipe import (CACHE_ENV, CACHE_FORMAT, DEMO_CONFIG, NUMERIC_ENV, ModelConfig, benchmark, build_tiny_llava,
                     default_cache_dir, exec_with_numeric_env, fixed_numerics, load_or_train, numeric_env, recipe_version, train_tiny_llava,
                     weights_digest)
from .summary import (TARGETS, acceptance, format_acceptance, format_learning, format_table, headline_rows,
                      plot_report, summarize)

__all__ = ["EPILOG", "add_arguments", "main", "parser", "DEFAULT_METHOD", "DEFAULT_SCHEDULE", "EXPERIMENTAL", "METHOD_SELECT",
           "DEFAULT_METHODS", "OFFICIAL", "official_inputs", "METHODS", "OURS", "SCHEDULES", "ExperimentConfig", "RunConfig", "budget_candidates", "check_experiment",
           "check_run", "learned_accuracy", "question_sets", "run_experiment", "run_world", "run_worlds",
           "tower_alphas", "train_until_learned", "CACHE_ENV", "CACHE_FORMAT", "DEMO_CONFIG", "NUMERIC_ENV",
           "ModelConfig", "benchmark", "build_tiny_llava", "default_cache_dir", "exec_with_numeric_env", "fixed_numerics", "load_or_train",
           "numeric_env", "recipe_version", "train_tiny_llava", "weights_digest", "TARGETS", "acceptance",
           "format_acceptance", "format_learning", "format_table", "headline_rows", "plot_report", "summarize"]
