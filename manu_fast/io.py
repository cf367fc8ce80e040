"""safetensors I/O shared by statistics and masks: atomic writes, clear errors, never pickle.

Every file carries a SHA-256 of its metadata and tensor bytes (metadata entry ``sha256``), and a file without
one is refused: safetensors itself checks only the header's structure, so a flipped byte in the data would
load silently.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .schema import StatsFileError

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
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={**metadata, CHECKSUM_KEY: content_digest(tensors, metadata)})
        with open(tmp, "rb") as f:  # on disk before the rename, so a crash leaves the old file or the new one
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
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
