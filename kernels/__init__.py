"""Triton kernels (installed as manu_fast.kernels): the ``triton`` backend of both ops of ``manu_fast.ops``.

``act_stats_triton``: the fused activation + mask + segmented statistics op (elementwise kernel);
``gated_linear_act_stats_triton``: the gated front half, either the fused gate/up GEMM with the same epilogue
(``gated_act_stats_triton``) or cuBLAS + the elementwise kernel, as ``prefer_fused_gemm`` decides per shape.
"""
from .act_stats import act_stats_triton
from .gated_gemm import gated_act_stats_triton, gated_linear_act_stats_triton, prefer_fused_gemm

__all__ = ["act_stats_triton", "gated_act_stats_triton", "gated_linear_act_stats_triton", "prefer_fused_gemm"]
