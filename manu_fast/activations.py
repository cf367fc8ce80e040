"""The activation set shared by every backend, and how HF activation modules map onto it.

Each backend implements the same names; the reference implementations below work in any float
dtype (the reference op runs them in float64).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))


ACTIVATIONS = {
    "silu": F.silu,
    "gelu": lambda x: 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0))),
    "gelu_tanh": _gelu_tanh,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "identity": lambda x: x,
}
# Integer codes used by the compiled backends (C++ and Triton); order is part of their ABI.
ACT_CODES = {name: i for i, name in enumerate(ACTIVATIONS)}

# HF config strings (ACT2FN keys) -> our names.
_HF_NAMES = {
    "silu": "silu", "swish": "silu",
    "gelu": "gelu", "gelu_python": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh", "gelu_accurate": "gelu_tanh",
    "quick_gelu": "quick_gelu", "relu": "relu", "linear": "identity",
}


def check_activation(name: str) -> str:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; supported: {', '.join(ACTIVATIONS)}")
    return name


def activation_name(module_or_name) -> str:
    """Map an HF activation module (or ACT2FN key) to one of ACTIVATIONS, or raise a clear error."""
    if isinstance(module_or_name, str):
        if module_or_name in _HF_NAMES:
            return _HF_NAMES[module_or_name]
        raise ValueError(f"unsupported activation {module_or_name!r}; supported HF names: {sorted(_HF_NAMES)}")
    m = module_or_name
    cls = type(m).__name__
    if isinstance(m, nn.SiLU) or cls in ("SiLUActivation", "SiLU"):
        return "silu"
    if isinstance(m, nn.GELU):
        return "gelu_tanh" if m.approximate == "tanh" else "gelu"
    if cls == "GELUActivation":
        return "gelu"
    if cls in ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation", "FastGELUActivation", "AccurateGELUActivation"):
        return "gelu_tanh"
    if cls == "QuickGELUActivation":
        return "quick_gelu"
    if isinstance(m, nn.ReLU):
        return "relu"
    if isinstance(m, nn.Identity) or cls == "LinearActivation":
        return "identity"
    raise ValueError(
        f"unsupported activation module {cls}; supported: SiLU, GELU (exact/tanh), QuickGELU, ReLU, identity"
    )
