"""Triton kernels (installed as manu_fast.kernels): the fused activation + mask + segmented statistics op
(``act_stats_triton``, the ``triton`` backend of ``manu_fast.ops.act_stats``) and the fused gate/up GEMM
with the same epilogue (``gated_act_stats_triton``, chosen per shape by ``prefer_fused_gemm``)."""
from .act_stats import act_stats_triton
from .gated_gemm import gated_act_stats_triton, prefer_fused_gemm

__all__ = ["act_stats_triton", "gated_act_stats_triton", "prefer_fused_gemm"]
