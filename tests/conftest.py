"""Shared pytest set-up.

Without CUDA, Triton kernels run through Triton's CPU interpreter. TRITON_INTERPRET is read when a
``@triton.jit`` function is defined, so it is set here, before any test module imports manu_fast.kernels.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
