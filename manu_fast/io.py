"""safetensors I/O shared by statistics and masks: atomic writes, clear errors, never pickle."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


def save_tensors(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_tensors(path, expected_format: str, what: str):
    from .stats import StatsFileError
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise StatsFileError(f"{path}: not a readable safetensors {what} file ({e})") from None
    if meta.get("format") != expected_format:
        raise StatsFileError(f"{path}: not a manu_fast {what} file (format {meta.get('format')!r}, expected {expected_format!r})")
    return tensors, meta
