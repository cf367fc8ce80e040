"""manu_fast: fused, kernel-backed Modality-Aware Neuron Unlearning (MANU) for multimodal LLMs.

The package's top-level names are loaded lazily, so that ``manu-fast --help`` (and any module that only needs the
vocabulary in ``manu_fast.schema``) does not import torch.
"""
import importlib

__version__ = "0.1.0"
_LAZY = {"ACTIVATIONS": "activations", "act_stats": "ops", "FIELDS": "schema", "NeuronStats": "stats",
         "StatsFileError": "schema"}
__all__ = ["ACTIVATIONS", "FIELDS", "NeuronStats", "StatsFileError", "act_stats"]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
