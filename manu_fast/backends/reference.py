"""The reference backend of both ops: PyTorch, float64 for the activation and the statistics. It is the oracle
every compiled backend is tested against and the fallback where none is available."""
from __future__ import annotations

import torch

from ..activations import ACTIVATIONS
from ..stats import merge_into, segment_stats_reference
from .contract import linear_then_act_stats


def hidden(pre, up, act, keep):
    """h = act(pre) [* up] with masked neurons zeroed, in PyTorch, in pre's dtype (differentiable)."""
    h = ACTIVATIONS[act](pre)
    if up is not None:
        h = h * up
    if keep is not None:
        h = torch.where(keep.to(h.device), h, torch.zeros((), dtype=h.dtype, device=h.device))
    return h


def act_stats_reference(pre, up, act, keep, gid, num_groups, tau, hidden_acc, pre_acc, up_acc, write_out):
    """The ``act_stats`` contract in float64: h and every statistic computed from the float64 inputs."""
    p64 = pre.to(torch.float64)
    u64 = None if up is None else up.to(torch.float64)
    h = hidden(p64, u64, act, keep)
    if gid is None:
        gid = torch.zeros(pre.shape[0], dtype=torch.int32, device=pre.device)
    for acc, a in ((hidden_acc, h), (pre_acc, p64), (up_acc, u64)):
        if acc is not None:
            merge_into(acc, segment_stats_reference(a, gid, num_groups, tau))
    return h.to(pre.dtype, memory_format=torch.contiguous_format) if write_out else None  # contiguous, as promised


def gated_linear_act_stats_reference(*args):
    """The projections in x.dtype (as the HF module computes them), then the reference ``act_stats``."""
    return linear_then_act_stats(act_stats_reference, *args)
