"""The vocabulary every part of manu_fast agrees on, in one module that imports nothing (not even torch), so
the CLI's parser and every module derive their names and choices from here.

- statistics fields (``FIELDS``, ``FIELD_INDEX``: their order is also the C++ ``enum Field`` and the Triton
  merge's layout, checked by tests/test_field_order.py), the default activity threshold;
- group labels ``split/modality/kind`` and data keys ``split/modality`` (``group_label``, ``data_key``);
- profiling/mask sites (``SITES``), which sites each MLP layer kind has (``KIND_SITES``) and their widths;
- towers, token kinds, splits, modalities and the other choices the API and the CLI accept;
- the error raised for unusable statistics/mask files, and the model-fingerprint comparison.

The backends' raw-argument contract lives in ``manu_fast.backends.contract``; see docs/OPS.md for the op
contract and the meaning of every field.
"""
from __future__ import annotations

FIELDS = ("count", "mean", "m2", "sum_abs", "sum_sq", "active", "nonfinite")
FIELD_INDEX = {name: i for i, name in enumerate(FIELDS)}
NUM_FIELDS = len(FIELDS)
DEFAULT_TAU = 0.1

SITES = ("hidden", "pre", "up", "out")
# The sites of each MLP layer kind: "gated" act(gate) * up, "plain" act(fc1), "gate_up" one Linear giving gate and
# up (no own pre/up output). "out" is the MLP's output (the residual-stream width), the rest have one per neuron.
KIND_SITES = {"gated": ("hidden", "pre", "up", "out"), "plain": ("hidden", "pre", "out"), "gate_up": ("hidden", "out")}

TOWERS = ("vision", "projector", "language")
IMAGE_TOWERS = ("vision", "projector")
TOKEN_KINDS = ("image", "video", "audio", "special", "text")  # language-model token kinds, in group-label order
SPLITS = ("forget", "retain")
MODALITIES = ("multimodal", "text")
PROFILE_MODES = ("answer", "question", "all")
DTYPE_NAMES = ("float32", "bfloat16", "float16")
MOE_POLICIES = ("refuse", "skip")
NONFINITE_POLICIES = ("count", "error")
STRATEGIES = ("manu-code", "manu-paper", "selective-pruning", "power-ratio", "random")
METRICS = ("abs", "freq", "std", "rms")
BENCHMARKS = ("mllmu", "clear")
PROTOCOLS = ("logit", "mllmu", "clear")
MLLMU_TASKS = ("classification", "generation", "cloze")
CLEAR_DS_SIZE = 300  # config/mm/eval.yaml ds_size: the first rows of each CLEAR task scored (0 = all)
GENERATION_INPUTS = ("text", "image")  # CLEAR's replies: from its decoded text prompt, or (ours) with the image


class StatsFileError(ValueError):
    """A statistics or mask file that cannot be used (corrupt, wrong format, other model)."""


def data_key(split: str, modality: str) -> str:
    """The key of one profiling data set and of its evaluation results: ``split/modality``."""
    return f"{split}/{modality}"


def group_label(split: str, modality: str, kind: str) -> str:
    """The label of one statistics group: ``split/modality/kind``."""
    return f"{data_key(split, modality)}/{kind}"


def layer_sites(layer_info: dict) -> tuple[str, ...]:
    """The sites a layer (a fingerprint entry) has, from its kind."""
    kind = layer_info.get("kind")
    if kind not in KIND_SITES:
        raise ValueError(f"unknown MLP layer kind {kind!r}; expected one of {tuple(KIND_SITES)}")
    return KIND_SITES[kind]


def site_length(layer_info: dict, site: str) -> int:
    """Length of a statistics block / keep vector of one layer (a fingerprint entry) at ``site``."""
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; expected one of {SITES}")
    if site not in layer_sites(layer_info):
        raise ValueError(f"site {site!r} does not exist on an MLP of kind {layer_info.get('kind')!r} "
                         f"(it has {', '.join(layer_sites(layer_info))})")
    return int(layer_info["hidden"] if site == "out" else layer_info["neurons"])


def check_fingerprint(expected: dict, found: dict, path=None) -> None:
    """Raise StatsFileError naming the first difference between two model fingerprints."""
    where = f"{path}: " if path else ""
    if expected == found:
        return
    if expected.get("model_type") != found.get("model_type"):
        raise StatsFileError(f"{where}made for model type {found.get('model_type')!r}, this model is {expected.get('model_type')!r}")
    el, fl = expected.get("layers", {}), found.get("layers", {})
    missing = sorted(set(el) - set(fl))
    extra = sorted(set(fl) - set(el))
    if missing or extra:
        raise StatsFileError(f"{where}made for another model: layers missing {missing[:3]}, unknown {extra[:3]}")
    for name in el:
        if el[name] != fl[name]:
            raise StatsFileError(f"{where}layer {name!r} differs: file has {fl[name]}, model has {el[name]}")
    raise StatsFileError(f"{where}model fingerprint differs")
