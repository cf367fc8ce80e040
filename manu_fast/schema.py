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
# Mask sites: one of SITES, or "linear": output rows of several Linears at once, keyed "layer::site" (site pre/up/out),
# what manu-official prunes (fc1 + fc2, gate + up + down rows)
LINEAR_ROW_SITES = ("pre", "up", "out")
MASK_SITES = SITES + ("linear",)

TOWERS = ("vision", "projector", "language")
IMAGE_TOWERS = ("vision", "projector")
TOKEN_KINDS = ("image", "video", "audio", "special", "text")  # language-model token kinds, in group-label order
SPLITS = ("forget", "retain")
MODALITIES = ("multimodal", "text")
PROFILE_MODES = ("answer", "question", "all")
DTYPE_NAMES = ("float32", "bfloat16", "float16")
MOE_POLICIES = ("refuse", "skip")
NONFINITE_POLICIES = ("count", "error")
STRATEGIES = ("manu-code", "manu-official", "manu-paper", "selective-pruning", "power-ratio", "random")
STATISTICS = ("exact", "official")  # profile(statistics=...): manu_fast's token statistics, or the official code's
OFFICIAL_LAYERS = ("as-run", "per-layer")  # manu-official: layers pooled as the code runs, or one name per layer
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


def in_tower_order(towers) -> list[str]:
    """The distinct towers of ``towers`` in the model's order (TOWERS: vision, projector, language), others after."""
    present = set(towers)
    return [t for t in TOWERS if t in present] + sorted(present - set(TOWERS))


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


def _names(names: list, limit: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _towers(layers: dict) -> str:
    counts: dict = {}
    for info in layers.values():
        counts[info.get("tower", "?")] = counts.get(info.get("tower", "?"), 0) + 1
    return ", ".join(f"{n} {t}" for t, n in counts.items()) + " MLPs" if counts else "no MLPs"


FINGERPRINT_FIX = "make it again from this model (manu-fast profile, then select)"


def check_fingerprint(expected: dict, found: dict, path=None) -> None:
    """Raise StatsFileError naming both sides of the differences between two model fingerprints (``expected``: the
    model's, ``found``: the file's) and the fix."""
    where = f"{path}: " if path else ""
    if expected == found:
        return
    et, ft = expected.get("model_type"), found.get("model_type")
    el, fl = expected.get("layers", {}), found.get("layers", {})
    if et != ft:
        raise StatsFileError(f"{where}made for a {ft!r} model ({_towers(fl)}), this model is a {et!r} "
                             f"({_towers(el)}): {FINGERPRINT_FIX}")
    only_file, only_model = sorted(set(fl) - set(el)), sorted(set(el) - set(fl))
    if only_file or only_model:
        sides = [f"only in the file: {_names(only_file)}" if only_file else "",
                 f"only in the model: {_names(only_model)}" if only_model else ""]
        raise StatsFileError(f"{where}made for another {et!r} model: the file has {_towers(fl)}, this model "
                             f"{_towers(el)}; {'; '.join(x for x in sides if x)}: {FINGERPRINT_FIX}")
    differ = [n for n in el if el[n] != fl[n]]
    if differ:
        name, more = differ[0], len(differ) - 1
        if "compacted" in el[name] or "compacted" in fl[name]:
            side = "the full model" if "compacted" not in fl[name] else "another compaction of this model"
            if "compacted" not in el[name]:
                side, this = "a compacted model", "this model is not compacted"
            else:
                this = "this model is compacted"
            raise StatsFileError(f"{where}layer {name!r}: made for {side}, {this} (compaction renumbers the "
                                 "neurons): convert masks with manu_fast.masks.translate_masks, or profile and "
                                 "select on the model you apply them to")
        keys = [k for k in dict.fromkeys([*fl[name], *el[name]]) if fl[name].get(k) != el[name].get(k)]
        sides = "; ".join(f"{k} {fl[name].get(k)} in the file, {el[name].get(k)} in this model" for k in keys)
        others = f" (and {more} more layer{'s' if more > 1 else ''})" if more else ""
        raise StatsFileError(f"{where}made for another {et!r} model: layer {name!r} differs in {sides}{others}: "
                             f"{FINGERPRINT_FIX}")
    raise StatsFileError(f"{where}made for another model: the fingerprints differ outside the layers "
                         f"(file {sorted(found)}, model {sorted(expected)}): {FINGERPRINT_FIX}")
