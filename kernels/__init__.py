"""Triton kernels (installed as manu_fast.kernels): the fused activation + mask + segmented statistics op
(``act_stats_triton``, the ``triton`` backend of ``manu_fast.ops.act_stats``) and the fused gate/up GEMM
with the same epilogue (``gated_act_stats_triton``)."""
from .act_stats import act_stats_triton

__all__ = ["act_stats_triton"]
