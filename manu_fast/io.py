"""safetensors I/O shared by statistics and masks: atomic writes, clear errors, never pickle.

Every file carries a SHA-256 of its metadata and tensor bytes (metadata entry ``sha256``), and a file without
one is refused: safetensors itself checks only the header's structure, so a flipped byte in the data would
load silently.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .schema import FIELDS, KIND_SITES, StatsFileError

CHECKSUM_KEY = "sha256"


def content_digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 over the metadata (except the checksum itself) and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for key in sorted(metadata):
        if key != CHECKSUM_KEY:
            h.update(f"{key}={metadata[key]}\0".encode())
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def save_tensors(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f"{glob.escape(path.name)}.*.tmp"):  # left by a killed write of this file
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={**metadata, CHECKSUM_KEY: content_digest(tensors, metadata)})
        with open(tmp, "rb") as f:  # on disk before the rename, so a crash leaves the old file or the new one
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, SafetensorError):  # safetensors reports a full disk or a write error as its own type
            raise OSError(f"cannot write {path}: {e}") from None
        raise


def load_tensors(path, expected_format: str, what: str):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise StatsFileError(f"{path}: not a readable safetensors {what} file ({e})") from None
    if meta.get("format") != expected_format:
        raise StatsFileError(f"{path}: not a manu_fast {what} file (format {meta.get('format')!r}, expected {expected_format!r})")
    if CHECKSUM_KEY not in meta:
        raise StatsFileError(f"{path}: the {what} file has no checksum (metadata entry {CHECKSUM_KEY!r}): it was not "
                             "written by manu_fast or was tampered with")
    if meta[CHECKSUM_KEY] != content_digest(tensors, meta):
        raise StatsFileError(f"{path}: the {what} file's content does not match its SHA-256 checksum: it was modified "
                             "or corrupted after it was written")
    return tensors, meta


# ---------------------------------------------------------------------------------------------------- file metadata
MAX_JSON_DEPTH = 128  # deeper than any file manu_fast writes (a masks description nests one level per round)
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def parse_json(text, path, field: str, max_depth: int = MAX_JSON_DEPTH):
    """``json.loads(text)``, refusing (StatsFileError naming ``field``) text that is no JSON or nests deeper than
    ``max_depth`` (checked before parsing, so hostile nesting cannot exhaust the stack) or holds NaN/Infinity."""
    if not isinstance(text, str):
        raise StatsFileError(f"{path}: metadata field {field!r} is missing or not text")
    depth = deepest = 0
    for bracket in _JSON_BRACKET.findall(_JSON_STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    if deepest > max_depth:
        raise StatsFileError(f"{path}: metadata field {field!r} nests more than {max_depth} levels deep")

    def refuse_constant(name):
        raise ValueError(f"{name} is not a number")
    try:
        return json.loads(text, parse_constant=refuse_constant)
    except (ValueError, RecursionError) as e:
        raise StatsFileError(f"{path}: metadata field {field!r} is not valid JSON ({e})") from None


MAX_NEURONS = 2**31 - 1  # every width a layer can have (int32 indices in the backends)


def _count(value, path, field: str, low: int = 0, high: int = MAX_NEURONS) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise StatsFileError(f"{path}: {field} must be an integer in [{low}, {high}], got {str(value)[:40]}")
    return value


def _text(value, path, field: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 4096:
        raise StatsFileError(f"{path}: {field} must be a non-empty string, got {str(value)[:40]}")
    return value


def check_fingerprint_fields(fp, path) -> dict:
    """Refuse (StatsFileError naming the field) a model fingerprint whose fields have the wrong types or sizes."""
    if not isinstance(fp, dict) or not isinstance(fp.get("layers"), dict):
        raise StatsFileError(f"{path}: fingerprint must be an object with a 'layers' object")
    _text(fp.get("model_type"), path, "fingerprint.model_type")
    for name, info in fp["layers"].items():
        where = f"fingerprint.layers[{name[:80]!r}]"
        if not isinstance(info, dict):
            raise StatsFileError(f"{path}: {where} must be an object")
        if not isinstance(info.get("kind"), str) or info["kind"] not in KIND_SITES:
            raise StatsFileError(f"{path}: {where}.kind must be one of {tuple(KIND_SITES)}, got {str(info.get('kind'))[:40]}")
        _text(info.get("tower"), path, f"{where}.tower")
        _count(info.get("neurons"), path, f"{where}.neurons", 1)
        _count(info.get("hidden"), path, f"{where}.hidden", 1)
        if "compacted" in info:
            c = info["compacted"]
            if not isinstance(c, dict) or not isinstance(c.get("kept_sha256"), str):
                raise StatsFileError(f"{path}: {where}.compacted must be an object with 'of' and 'kept_sha256'")
            _count(c.get("of"), path, f"{where}.compacted.of", 1)
    return fp


def check_moments(block: torch.Tensor, path, key: str) -> None:
    """Refuse (StatsFileError naming the block and field) statistics that no profiling run can produce: non-finite
    values, or negative counts and sums of squares/absolute values."""
    finite = torch.isfinite(block).flatten(1).all(1)
    for i, name in enumerate(FIELDS):
        if not bool(finite[i]):
            raise StatsFileError(f"{path}: block {key!r} field {name!r} holds NaN or Inf")
        if name != "mean" and bool((block[i] < 0).any()):
            raise StatsFileError(f"{path}: block {key!r} field {name!r} holds negative values")
