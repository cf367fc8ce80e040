"""Structural survey: every image-text-to-text model type of the installed transformers, built from its default
config (every layer stack cut to one layer) on the meta device (no weights), through
``manu_fast.adapters.inspect_model``. Run as a script it prints the table of docs/MODELS.md:

    python tests/survey_models.py
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import transformers as tf

from manu_fast.adapters import TOWERS, UnsupportedModelError, inspect_model, token_ids

_LAYER_COUNTS = ("num_hidden_layers", "depth", "num_layers", "encoder_layers", "decoder_layers")


@dataclass
class Row:
    model_type: str
    status: str  # "inferred" | "refused" | "not built here"
    mlps: tuple[int, int, int] = (0, 0, 0)  # per tower (vision, projector, language)
    parts: int = 0
    left_out: str = ""
    kinds: str = ""  # the language-model token kinds the config names ids of (besides text)


def _one_layer(config) -> None:
    for key, value in list(vars(config).items()):
        if isinstance(value, tf.PretrainedConfig):
            _one_layer(value)
        elif key in _LAYER_COUNTS and isinstance(value, int) and value > 1:
            setattr(config, key, 1)


def _left_out(found) -> str:
    """Counts of what is left out, by reason: 'mixture-of-experts', 'audio tower', ... or 'unrecognised'."""
    reasons: dict[str, int] = {}
    for s in found.skipped:
        reason = s.reason.split(" (")[0].split(":")[0] if s.moe or "tower" in s.reason else "unrecognised"
        reasons[reason] = reasons.get(reason, 0) + 1
    return ", ".join(f"{n} {r}" for r, n in reasons.items())


def survey_one(model_type: str, class_name: str) -> Row:
    try:
        config = tf.AutoConfig.for_model(model_type)
        _one_layer(config)
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = getattr(tf, class_name)(config)
    except Exception as e:  # noqa: BLE001 -- a default config this transformers cannot build, or a missing extra
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        return Row(model_type, "not built here", left_out=f"{type(e).__name__}: {first[:80]}")
    try:
        found = inspect_model(model)
    except UnsupportedModelError as e:
        return Row(model_type, "refused", left_out=str(e)[:100])
    counts = tuple(sum(i.tower == t for i in found.mlps) for t in TOWERS)
    return Row(model_type, "inferred", counts, sum(i.patched_as == "part" for i in found.mlps), _left_out(found),
               ", ".join(token_ids(model)) or "none")


def survey() -> list[Row]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as names
    return [survey_one(mt, cls) for mt, cls in sorted(names.items())]


def markdown(rows: list[Row]) -> str:
    lines = [f"transformers {tf.__version__}: {len(rows)} image-text-to-text model types, "
             f"{sum(r.status == 'inferred' for r in rows)} inferred, {sum(r.status == 'refused' for r in rows)} "
             f"refused, {sum(r.status == 'not built here' for r in rows)} not built here; "
             f"{sum(r.kinds == 'none' for r in rows)} inferred types name no language-model token id of an image, "
             "video or boundary token.", "",
             "| model type | towers | MLPs vision / projector / language (one layer per stack) | MLP parts "
             "| left out | token ids named |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        mlps = " / ".join(map(str, r.mlps)) if r.status == "inferred" else ""
        lines.append(f"| `{r.model_type}` | {r.status} | {mlps} | {r.parts if r.status == 'inferred' else ''} | "
                     f"{r.left_out.replace('|', '/')} | {r.kinds} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(survey()))
