"""Where a MODEL argument points: a local folder written by ``save_pretrained``, or a model id on the Hugging Face
Hub (``llava-hf/llava-1.5-7b-hf``), resolved by transformers / huggingface_hub as usual: downloaded into the hub
cache, or read from that cache when offline (``HF_HUB_OFFLINE=1``). Every refusal is one line that says which of
the two MODEL was taken for and what is missing.
"""
from __future__ import annotations

import re
from pathlib import Path

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.index.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".parquet")  # a file named, never a hub id


def is_hub_id(model) -> bool:
    """Whether ``model`` is taken for a hub id: no such local path, and shaped like ``name`` or ``owner/name``."""
    text = str(model)
    return (not Path(text).exists() and _HUB_ID.match(text) is not None and not text.startswith(".")
            and not text.endswith(FILE_SUFFIXES))


def _first_sentence(error: Exception) -> str:
    text = " ".join(str(error).split())
    return text.split(". ")[0].rstrip(".")


def _not_found(model, error: Exception | None = None) -> OSError:
    if not is_hub_id(model):
        path = Path(str(model))
        what = "has no config.json" if path.is_dir() else "not found"
        return FileNotFoundError(f"model folder {what}: {model}")
    from huggingface_hub import constants
    where = (f"not in the local hub cache {constants.HF_HUB_CACHE} (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE
             else "not found on the Hugging Face Hub")
    detail = f" ({_first_sentence(error)})" if error is not None and constants.HF_HUB_OFFLINE is False else ""
    return OSError(f"model {model!r}: no such local folder, and as a hub model id {where}{detail}")


def load_config(model):
    """The transformers config of ``model`` (folder or hub id)."""
    import transformers as tf
    if not is_hub_id(model) and not (Path(str(model)) / "config.json").is_file():
        raise _not_found(model)
    try:
        return tf.AutoConfig.from_pretrained(str(model))
    except OSError as e:
        raise _not_found(model, e) from None


def local_files(model) -> Path:
    """A local folder with ``model``'s files other than the weights: the folder itself, or the hub cache's snapshot
    (fetched without the weights when online)."""
    if not is_hub_id(model):
        return Path(str(model))
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(str(model), ignore_patterns=list(WEIGHT_PATTERNS)))
    except Exception as e:  # huggingface_hub's errors: offline and not cached, unknown repo, network
        raise _not_found(model, e) from None


PROCESSOR_PARTS = {"the image processor (processor_config.json or preprocessor_config.json)":
                   ("processor_config.json", "preprocessor_config.json"),
                   "the tokenizer (tokenizer.json, tokenizer.model or vocab.json)":
                   ("tokenizer.json", "tokenizer.model", "vocab.json"),
                   "tokenizer_config.json": ("tokenizer_config.json",)}


def load_processor(model):
    """The processor (tokenizer, image processor, chat template) saved with ``model``; a refusal names the missing
    files and how to save them."""
    from transformers import AutoProcessor
    if not is_hub_id(model) and not Path(str(model)).is_dir():
        raise _not_found(model)  # a MODEL that is nowhere is refused as such, not as a missing processor
    try:
        return AutoProcessor.from_pretrained(str(model))
    except (OSError, ValueError, TypeError) as e:
        folder = local_files(model)
        missing = [part for part, names in PROCESSOR_PARTS.items() if not any((folder / n).is_file() for n in names)]
        what = f"missing {', '.join(missing)}" if missing else _first_sentence(e)
        target = repr(str(model)) if not is_hub_id(model) else "MODEL_DIR"
        raise ValueError(f"{model}: no usable processor saved with the model ({what}); save the processor the model "
                         f"was trained with next to its weights: AutoProcessor.from_pretrained(BASE_MODEL)"
                         f".save_pretrained({target})") from None
