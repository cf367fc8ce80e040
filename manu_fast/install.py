"""What this installation has: optional packages (with the one line that installs a missing one), the versions
``manu-fast --version`` prints, which backend runs on each device and, when a compiled backend is missing, the
command that builds it for this kind of installation (a source checkout installed with ``pip install -e .``, or a
regular install into site-packages).

Importing this module imports nothing heavy; torch is imported by the functions that need it.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
from pathlib import Path

EVAL_EXTRA = 'pip install "manu-fast[eval]"'
# module -> (distribution, the install line that brings it)
OPTIONAL = {"pyarrow": ("pyarrow", EVAL_EXTRA), "rouge_score": ("rouge-score", EVAL_EXTRA),
            "matplotlib": ("matplotlib", EVAL_EXTRA), "PIL": ("pillow", EVAL_EXTRA),
            "triton": ("triton", 'pip install "manu-fast[triton]"'),
            "accelerate": ("accelerate", 'pip install "manu-fast[dist]"')}


def require(module: str, purpose: str):
    """``importlib.import_module(module)``, or an ImportError saying in one line what needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        dist, line = OPTIONAL[module.split(".")[0]]
        raise ImportError(f"{purpose} needs the {dist} package, which is not installed: {line}") from None


def source_checkout() -> Path | None:
    """The repository folder when manu_fast runs from a source checkout (an editable install), else None."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "setup.py").is_file() and (root / "csrc").is_dir() else None


def cpp_fix() -> str:
    """How to build the C++ CPU kernel (manu_fast._C) for this installation."""
    root = source_checkout()
    if root is not None:
        return f"rebuild it with `pip install -e {root}` (needs a C++17 compiler and pybind11)"
    return ("reinstall manu-fast from its source with a C++17 compiler and pybind11 present "
            "(`pip install pybind11 && pip install --force-reinstall --no-deps <manu_fast source folder or sdist>`)")


def triton_fix() -> str:
    return f"install Triton: {OPTIONAL['triton'][1]}"


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


BACKEND_TEXT = {"cpp": "C++ kernel (manu_fast._C)", "triton": "Triton kernels", "reference": "PyTorch reference (slow)"}


def backend_line(device) -> str:
    """What runs the fused op on ``device`` (a torch.device), and the fix when a faster backend is missing."""
    from . import ops
    forced = os.environ.get("MANU_FAST_BACKEND")
    if forced:
        return f"{BACKEND_TEXT.get(forced, forced)} (forced by MANU_FAST_BACKEND={forced})"
    if device.type == "cpu":
        return BACKEND_TEXT["cpp"] if ops.cpp_available() else \
            f"{BACKEND_TEXT['reference']}: manu_fast._C is not built; {cpp_fix()}"
    if device.type == "cuda":
        if ops.triton_available():
            interp = " in the CPU interpreter (TRITON_INTERPRET=1)" if os.environ.get("TRITON_INTERPRET") == "1" else ""
            return BACKEND_TEXT["triton"] + interp
        return f"{BACKEND_TEXT['reference']}: the Triton kernels are unavailable; {triton_fix()}"
    return f"{BACKEND_TEXT['reference']} (no compiled backend for {device.type})"


def run_line(device: str, dtype: str, what: str) -> str:
    """The line a long command prints when it starts: what it runs, on which device, dtype and backend."""
    import torch
    return f"manu-fast {what}: device {device}, dtype {dtype}, backend: {backend_line(torch.device(device))}"


def version_text() -> str:
    """``manu-fast --version``: the versions that matter and, per device, which backend runs."""
    import torch
    lines = [f"manu-fast {version('manu_fast')}" + (f" (source checkout {source_checkout()})" if source_checkout() else ""),
             f"torch {torch.__version__}, transformers {version('transformers')}, triton {version('triton')}, "
             f"safetensors {version('safetensors')}"]
    lines.append(f"cpu:  {backend_line(torch.device('cpu'))}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            lines.append(f"cuda:{i}: {torch.cuda.get_device_name(i)}: {backend_line(torch.device('cuda', i))}")
    else:
        built = f"torch built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only torch build"
        lines.append(f"cuda: no CUDA device ({built})")
    interp = "on" if os.environ.get("TRITON_INTERPRET") == "1" else "off"
    lines.append(f"Triton interpreter (TRITON_INTERPRET=1, runs the Triton kernels on CPU tensors for tests): {interp}"
                 + ("" if version("triton") != "not installed" else ", needs triton"))
    return "\n".join(lines)
