"""Online (run-time) Hadamard transforms over the last dimension, as FWHT, with an explicit fallback."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .hadamard import fwht, hadamard, is_supported, random_signs

FALLBACKS = ("error", "block_diagonal")


def block_sizes(n: int) -> list[int]:
    """Split n greedily into supported Hadamard sizes, largest first (e.g. 188 -> [184, 4]); always
    terminates because 1 (and every power of two) is supported."""
    out, rest = [], n
    while rest:
        m = next(m for m in range(rest, 0, -1) if is_supported(m))
        out.append(m)
        rest -= m
    return out


class OnlineHadamard(nn.Module):
    """x [..., n] -> x H with H the orthonormal Hadamard of order n (FWHT).

    fallback="block_diagonal": for an n with no construction, H is block-diagonal with Hadamard blocks of
    `block_sizes(n)` (still orthogonal, mixes less). fallback="error": such an n raises, naming the size.
    """

    def __init__(self, n: int, fallback: str = "error"):
        super().__init__()
        if fallback not in FALLBACKS:
            raise ValueError(f"unknown Hadamard fallback {fallback!r}; choose one of {FALLBACKS}")
        self.n = n
        if is_supported(n):
            self.blocks = [n]
        elif fallback == "block_diagonal":
            self.blocks = block_sizes(n)
        else:
            hadamard(n)  # raises the descriptive UnsupportedHadamardSize
        self.fallback = fallback

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.n:
            raise ValueError(f"OnlineHadamard of size {self.n} got last dimension {x.shape[-1]}")
        if len(self.blocks) == 1:
            return fwht(x)
        return torch.cat([fwht(c) for c in x.split(self.blocks, dim=-1)], dim=-1)

    def matrix(self, dtype=torch.float64) -> torch.Tensor:
        """The dense orthogonal matrix [n, n] this module multiplies by (x @ M)."""
        return torch.block_diag(*[hadamard(b) / math.sqrt(b) for b in self.blocks]).to(dtype)

    def extra_repr(self) -> str:
        return f"n={self.n}, blocks={self.blocks}"


def random_orthogonal_hadamard(n: int, seed: int = 0, fallback: str = "error", dtype=torch.float64) -> torch.Tensor:
    """diag(±1) · M with M the orthonormal (block-)Hadamard of `OnlineHadamard(n, fallback)`: [n, n]."""
    return (random_signs(n, seed)[:, None] * OnlineHadamard(n, fallback).matrix()).to(dtype)
