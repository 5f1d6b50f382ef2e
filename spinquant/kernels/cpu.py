"""CPU low-bit matmuls on PyTorch's own packed ops, with the layout conversions they need.

- int4 weights (any bits <= 4, per-channel or groups of 32/64/128/256): `_weight_int4pack_mm_for_cpu`,
  bf16 activations, dequant = (u - 8)·scale + zero_f per group, u the unsigned 4-bit code.
- int8 per-channel weights, 16-bit activations: `_weight_int8pack_mm`.
- int8 per-channel weights x int8 per-token activations: `torch._int_mm` (exact int32 accumulation).
Shapes the ops refuse (N not a multiple of 16, K not a multiple of the group) are zero-padded by the
callers in `linear.py`; these functions check and say so instead of crashing inside torch.
"""
from __future__ import annotations

import functools

import torch

INT4_GROUPS = (256, 128, 64, 32)  # group sizes the CPU int4 kernel accepts (largest first)
INT4_N_MULTIPLE = 16
INT8_K_MULTIPLE = 64  # _weight_int8pack_mm crashes (segfault) on some K that are not multiples of 32/64


def pack_int4(u: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit codes u [N, K] (values 0..15) -> the CPU kernel's packed uint8 layout."""
    N, K = u.shape
    if N % INT4_N_MULTIPLE or K % 2:
        raise ValueError(f"int4 CPU packing needs N % {INT4_N_MULTIPLE} == 0 and even K, got [{N}, {K}]")
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.to(torch.int32).contiguous(), 1)


@functools.lru_cache(maxsize=4)
def _int4_layout(N: int, K: int) -> torch.Tensor:
    """perm [N*K] with kernel_nibbles.flatten() == canonical_codes.flatten()[perm], found by probing the op.

    The kernel's layout is blocked and may differ between CPU builds, so it is not hard-coded: packing
    the base-16 digits of every position's index reveals where each code lands (a value-independent
    permutation, checked to be one).
    """
    idx = torch.arange(N * K, dtype=torch.int64)
    perm = torch.zeros(N * K, dtype=torch.int64)
    digits = 0
    while 16**digits < N * K:
        digits += 1
    for d in range(max(digits, 1)):
        probe = ((idx // 16**d) % 16).reshape(N, K)
        perm += unpack_nibbles_raw(pack_int4(probe).reshape(-1)).to(torch.int64) * 16**d
    if not torch.equal(perm.sort().values, idx):
        raise RuntimeError("the CPU int4 kernel's packing is not a permutation of codes; cannot unpack it")
    return perm.to(torch.int32)


def pack_nibbles_raw(u: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., 2B] (each < 16) -> uint8 [..., B], low nibble first: the inverse of unpack_nibbles_raw."""
    return (u[..., 0::2] | (u[..., 1::2] << 4)).contiguous()


def unpack_nibbles_raw(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., B] -> uint8 [..., 2B]: low nibble first, then high nibble (storage order, no permutation)."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1)


def unpack_int4(packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """Inverse of `pack_int4`: the kernel layout -> unsigned codes [N, K] (uint8)."""
    flat = unpack_nibbles_raw(packed.reshape(-1))
    out = torch.empty(N * K, dtype=torch.uint8)
    out[_int4_layout(N, K)] = flat
    return out.reshape(N, K)


def int4_mm(x: torch.Tensor, packed: torch.Tensor, group: int, scales_zeros: torch.Tensor) -> torch.Tensor:
    """x [M, K] bf16 @ dequant(packed)ᵀ -> [M, N] bf16. scales_zeros [K/group, N, 2] bf16."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_zeros)


def int8_weight_mm(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] bf16 @ (w [N, K] int8 · scales [N])ᵀ -> [M, N] bf16."""
    if x.shape[-1] % INT8_K_MULTIPLE:
        raise ValueError(f"_weight_int8pack_mm needs K % {INT8_K_MULTIPLE} == 0, got K={x.shape[-1]} (pad first)")
    return torch.ops.aten._weight_int8pack_mm(x, w, scales)


def int8_int8_mm(xq: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """xq [M, K] int8 @ w_t [K, N] int8 -> [M, N] int32, exact."""
    return torch._int_mm(xq, w_t)
