"""manu_fast: fused, kernel-backed Modality-Aware Neuron Unlearning (MANU) for multimodal LLMs.

The package's top-level names are loaded lazily, so that ``manu-fast --help`` (and any module that only needs the
vocabulary in ``manu_fast.schema``) does not import torch.
"""
import importlib

__version__ = "0.1.0"


def lazy_attributes(package: str, names: dict[str, str]):
    """A module ``__getattr__`` for ``package`` that imports ``names[name]`` (a submodule) on first use of ``name``
    and keeps the value as a module attribute (PEP 562)."""
    module = importlib.import_module(package)

    def __getattr__(name):
        if name in names:
            value = getattr(importlib.import_module(f".{names[name]}", package), name)
            setattr(module, name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return __getattr__


_LAZY = {"ACTIVATIONS": "activations", "act_stats": "ops", "FIELDS": "schema", "NeuronStats": "stats",
         "StatsFileError": "schema"}
__all__ = sorted(_LAZY)
__getattr__ = lazy_attributes(__name__, _LAZY)
