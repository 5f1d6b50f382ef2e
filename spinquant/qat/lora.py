"""LoRA adapters: y += B·A·x · alpha/r, starting as an exact no-op (B = 0).

With `pool_group=g` (QA-LoRA) A reads the input averaged over each run of g features, so the update
B·A is constant inside every quantization group of g weights and can be merged into the zero-points
without leaving the integer grid (see `qat.convert(merge=True)`).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRA(nn.Module):
    """x [..., in] -> B·A·pool(x) · alpha/rank [..., out]."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0,
                 pool_group: int | None = None, name: str = "linear"):
        super().__init__()
        if pool_group is not None and (pool_group < 1 or in_features % pool_group):
            raise ValueError(f"LoRA on {name}: pool group {pool_group} does not divide in_features {in_features}")
        a_in = in_features // pool_group if pool_group else in_features
        if not 1 <= rank <= min(a_in, out_features):
            raise ValueError(f"LoRA rank {rank} on {name} must be in 1..{min(a_in, out_features)} (layer "
                             f"{in_features}->{out_features}" + (f", {a_in} pooled inputs" if pool_group else "") + ")")
        self.in_features, self.out_features, self.rank, self.pool_group = in_features, out_features, rank, pool_group
        self.scaling = alpha / rank
        self.A = nn.Parameter(torch.empty(rank, a_in))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool_group:
            x = x.reshape(*x.shape[:-1], -1, self.pool_group).mean(-1)
        return F.linear(F.linear(self.dropout(x), self.A.to(x.dtype)), self.B.to(x.dtype)) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The dense update [out, in] this adapter adds to the weight (in eval mode, without dropout)."""
        d = (self.B @ self.A) * self.scaling
        if self.pool_group:
            d = d.repeat_interleave(self.pool_group, dim=1) / self.pool_group
        return d

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, pool_group={self.pool_group}"
