"""What this installation has: optional packages (with the one line that installs a missing one), package
versions, and, when a compiled backend is missing, the command that builds it for this kind of installation (a
source checkout installed with ``pip install -e .``, or a regular install into site-packages).
``manu_fast.ops.describe_backend`` says which backend runs on a device; ``manu-fast --version`` prints both.

Imports nothing but the standard library.
"""
from __future__ import annotations

import importlib
import importlib.metadata
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
        importlib.import_module(module.partition(".")[0])  # the package first: a submodule imported earlier is cached
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
