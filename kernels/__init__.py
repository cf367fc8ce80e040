"""Triton kernels (installed as manu_fast.kernels). Filled in by the Triton issue."""
