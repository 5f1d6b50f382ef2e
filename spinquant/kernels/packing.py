"""Bit-packing of integer codes: b-bit codes (any b in 1..8) packed densely, little-endian within bytes."""
from __future__ import annotations

import numpy as np
import torch


def pack_bits(codes: torch.Tensor, bits: int, offset: int = 0) -> torch.Tensor:
    """Integer codes (any shape, values in [-offset, 2^bits - 1 - offset]) -> uint8 [ceil(numel·bits/8)]."""
    u = (codes.reshape(-1).to(torch.int32) + offset)
    if u.numel() and (u.min() < 0 or u.max() >= 2**bits):
        raise ValueError(f"codes out of range for {bits}-bit packing with offset {offset}")
    arr = u.numpy().astype(np.uint8)
    bitplanes = np.unpackbits(arr[:, None], axis=1, bitorder="little")[:, :bits]  # [n, bits]
    return torch.from_numpy(np.packbits(bitplanes.reshape(-1), bitorder="little").copy())


def unpack_bits(packed: torch.Tensor, bits: int, numel: int, offset: int = 0) -> torch.Tensor:
    """Inverse of pack_bits: uint8 bytes -> int32 codes [numel]."""
    planes = np.unpackbits(packed.numpy(), bitorder="little")[: numel * bits].reshape(numel, bits)
    vals = np.packbits(np.concatenate([planes, np.zeros((numel, 8 - bits), np.uint8)], axis=1), axis=1,
                       bitorder="little")[:, 0]
    return torch.from_numpy(vals.astype(np.int32)) - offset
