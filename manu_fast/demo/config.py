"""The demo's configuration, torch-free: the methods it runs, and the three dataclasses whose fields are also its
command-line options (``options.option``), so that ``manu-fast demo --help`` answers without importing torch."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from ..schema import PROFILE_MODES
from .options import option

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


@dataclass(frozen=True)
class ModelConfig:
    """The tiny LLaVA and how it is trained (everything that decides the cached weights)."""

    num_people: int = option(40, "fictitious people in a world (the benchmark's size)", flag="--people")
    num_attributes: int = 6
    values_per_attribute: int = 8
    image_size: int = 16
    patch_size: int = 4
    vision_hidden: int = 64
    vision_intermediate: int = 128
    vision_layers: int = 2
    text_hidden: int = 64
    text_intermediate: int = option(512, "language-model MLP width (neurons per layer): the model's capacity")
    text_layers: int = 2
    text_act: str = "relu"
    # Train only the MLPs (and norms, projector, output head): attention and token embeddings stay at their random
    # initialisation, so the facts are stored in MLP neurons, the memory MANU prunes (docs/SELECTION.md).
    mlp_memory: bool = True
    # dropout on the MLP neurons while training: each retain fact is held by more neurons (docs/SELECTION.md)
    mlp_dropout: float = 0.1
    heads: int = 4
    train_steps: int = option(400, "training steps (a world below --learned-line is retrained with twice as many)")
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0

    def key(self) -> str:
        """Cache key: this configuration, the recipe's code and versions (see recipe_version)."""
        from .recipe import CACHE_FORMAT, recipe_version  # torch: only when a key is needed
        blob = json.dumps({"format": CACHE_FORMAT, **dataclasses.asdict(self), **recipe_version()},
                          sort_keys=True).encode()
        return "tiny-llava-" + hashlib.sha256(blob).hexdigest()[:16]
