"""Triton kernels: Hadamard transform, W4A16 dequantize-GEMM (group-wise), int8 x int8 GEMM with scales.

They run on GPUs and, under `TRITON_INTERPRET=1` (set before triton is imported), on the CPU, which is
how CI checks them. Each has a torch wrapper that validates its inputs and a float64 reference in the
tests.

- `hadamard(x)`: x [rows, n] -> x·H_n/sqrt(n) in `fwht`'s order, as two small matmuls per row: with
  H_n = A ⊗ H_P (P = min(2^k, 128), A = H_base ⊗ H_{2^a} dense, <= 256 wide), row x viewed as
  X [m, P] maps to Aᵀ·X·H_P (the tensor-core formulation of fast Hadamard transforms).
- `w4a16_matmul(x, qweight, scale, zero, group)`: x [M, K] @ Wᵀ with W = (u - 8)·scale + zero per group,
  u the 4-bit codes of `PackedLinear.export_tensors()` (two a byte, low nibble first).
- `int8_matmul(xq, w, x_scale, w_scale, x_zero, colsum)`: (xq - x_zero)·wᵀ accumulated in int32, then
  scaled per token and per output channel.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ..rotation.hadamard import base_matrix, kron_factors, sylvester

MAX_P, MAX_M = 128, 256


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# ---- Hadamard --------------------------------------------------------------------------------------
@triton.jit
def _hadamard_kernel(x_ptr, y_ptr, a_ptr, b_ptr, n, scale, M: tl.constexpr, MP: tl.constexpr, P: tl.constexpr,
                     PP: tl.constexpr, IEEE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, MP)
    j = tl.arange(0, PP)
    mask = (i[:, None] < M) & (j[None, :] < P)
    offs = row * n + i[:, None] * P + j[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)   # [MP, PP], zero-padded
    a = tl.load(a_ptr + i[:, None] * MP + i[None, :])                  # Aᵀ, zero-padded [MP, MP]
    b = tl.load(b_ptr + j[:, None] * PP + j[None, :])                  # H_P, zero-padded [PP, PP]
    if IEEE:
        t = tl.dot(x, b, input_precision="ieee")
        y = tl.dot(a, t, input_precision="ieee")
    else:
        t = tl.dot(x, b)
        y = tl.dot(a, t)
    tl.store(y_ptr + offs, (y * scale).to(y_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=32)
def _hadamard_factors(n: int):
    """(m, MP, P, PP, Aᵀ [MP, MP], H_P [PP, PP]) float32 with H_n = A ⊗ H_P, zero-padded to tl.dot's >= 16."""
    *bases, p = kron_factors(n)
    P = min(p, MAX_P)
    m = n // P
    if m > MAX_M:
        raise ValueError(f"triton hadamard supports n = m·P with P = min(2^k, {MAX_P}) and m <= {MAX_M}; n={n} gives "
                         f"m={m} (use spinquant.rotation.fwht)")
    A = functools.reduce(torch.kron, [base_matrix(b) for b in bases] + [sylvester(p // P)])
    MP, PP = max(16, _pow2(m)), max(16, P)
    At, B = torch.zeros(MP, MP), torch.zeros(PP, PP)
    At[:m, :m] = A.T.float()
    B[:P, :P] = sylvester(P).float()
    return m, MP, P, PP, At, B


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """x [..., n] -> x·H_n/sqrt(n), the same transform as `spinquant.rotation.hadamard.fwht`."""
    n = x.shape[-1]
    m, MP, P, PP, At, B = _hadamard_factors(n)
    x2 = x.reshape(-1, n).contiguous()
    y = torch.empty_like(x2)
    _hadamard_kernel[(x2.shape[0],)](x2, y, At.to(x.device), B.to(x.device), n, 1.0 / math.sqrt(n), M=m, MP=MP, P=P, PP=PP,
                                     IEEE=x.dtype == torch.float32)
    return y.reshape(x.shape)


# ---- W4A16 -----------------------------------------------------------------------------------------
@triton.jit
def _w4a16_kernel(x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, M, N, K, q_stride, n_groups, GROUP: tl.constexpr,
                  HAS_ZERO: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    rh = tl.arange(0, BK // 2)
    acc = tl.full((BM, BN), 0.0, tl.float32)
    for k0 in range(0, K, BK):
        xk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * K + xk[None, :], mask=(rm[:, None] < M) & (xk[None, :] < K), other=0.0)
        qk = k0 // 2 + rh
        p = tl.load(q_ptr + rn[:, None] * q_stride + qk[None, :], mask=(rn[:, None] < N) & (qk[None, :] < q_stride),
                    other=0x88)
        u = tl.reshape(tl.join(p & 0xF, p >> 4), (BN, BK)).to(tl.float32)   # code k = 2·byte + nibble
        g = k0 // GROUP
        s = tl.load(s_ptr + rn * n_groups + g, mask=rn < N, other=0.0)
        w = (u - 8.0) * s[:, None]
        if HAS_ZERO:
            w += tl.load(z_ptr + rn * n_groups + g, mask=rn < N, other=0.0)[:, None]
        if IEEE:
            acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w).to(x.dtype))
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 group: int | None, block=(16, 32, 32)) -> torch.Tensor:
    """x [M, K] @ Wᵀ -> [M, N]; qweight uint8 [N, ceil(K/2)], scale/zero [N, groups] (group None: per-channel)."""
    M, K = x.shape
    N = qweight.shape[0]
    if qweight.dtype != torch.uint8 or qweight.shape[1] != (K + 1) // 2:
        raise ValueError(f"qweight must be uint8 [N, ceil(K/2)] = [{N}, {(K + 1) // 2}], got {qweight.dtype} "
                         f"{list(qweight.shape)}")
    BM, BN, BK = block
    groups = 1 if group is None else K // group
    if group is not None and (K % group or group % BK):
        raise ValueError(f"group {group} must divide K={K} and be a multiple of the K block {BK}")
    if scale.shape != (N, groups) or (zero is not None and zero.shape != (N, groups)):
        raise ValueError(f"scale/zero must be [{N}, {groups}], got {list(scale.shape)}"
                         + ("" if zero is None else f" / {list(zero.shape)}"))
    x = x.contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    GROUP = group if group is not None else _pow2(K) * 2  # per-channel: every block is in group 0
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    _w4a16_kernel[grid](x, qweight.contiguous(), scale.float().contiguous(),
                        (zero if zero is not None else scale).float().contiguous(), y, M, N, K, qweight.shape[1], groups,
                        GROUP=GROUP, HAS_ZERO=zero is not None, BM=BM, BN=BN, BK=BK, IEEE=x.dtype == torch.float32)
    return y


# ---- int8 x int8 -----------------------------------------------------------------------------------
@triton.jit
def _int8_kernel(a_ptr, b_ptr, sa_ptr, za_ptr, sb_ptr, cs_ptr, y_ptr, M, N, K, HAS_ZERO: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.full((BM, BN), 0, tl.int32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        a = tl.load(a_ptr + rm[:, None] * K + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0)
        b = tl.load(b_ptr + rn[:, None] * K + kk[None, :], mask=(rn[:, None] < N) & (kk[None, :] < K), other=0)
        acc += tl.dot(a, tl.trans(b), out_dtype=tl.int32)
    if HAS_ZERO:
        za = tl.load(za_ptr + rm, mask=rm < M, other=0)
        cs = tl.load(cs_ptr + rn, mask=rn < N, other=0)
        acc -= za[:, None] * cs[None, :]
    sa = tl.load(sa_ptr + rm, mask=rm < M, other=0.0)
    sb = tl.load(sb_ptr + rn, mask=rn < N, other=0.0)
    y = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], y, mask=(rm[:, None] < M) & (rn[None, :] < N))


def int8_matmul(xq: torch.Tensor, w: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                x_zero: torch.Tensor | None = None, block=(16, 32, 32)) -> torch.Tensor:
    """((xq - x_zero) @ wᵀ) · x_scale[m] · w_scale[n] -> float32 [M, N]; xq [M, K] int8, w [N, K] int8,
    x_scale/x_zero [M] (x_zero integer-valued), w_scale [N]."""
    M, K = xq.shape
    N = w.shape[0]
    if xq.dtype != torch.int8 or w.dtype != torch.int8 or w.shape[1] != K:
        raise ValueError(f"int8_matmul needs int8 xq [M, K] and w [N, K], got {xq.dtype} {list(xq.shape)}, "
                         f"{w.dtype} {list(w.shape)}")
    BM, BN, BK = block
    y = torch.empty(M, N, dtype=torch.float32, device=xq.device)
    colsum = w.to(torch.int32).sum(1) if x_zero is not None else w_scale
    za = x_zero.to(torch.int32).reshape(M) if x_zero is not None else x_scale
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    _int8_kernel[grid](xq.contiguous(), w.contiguous(), x_scale.float().reshape(M).contiguous(), za.contiguous(),
                       w_scale.float().reshape(N).contiguous(), colsum.contiguous(), y, M, N, K,
                       HAS_ZERO=x_zero is not None, BM=BM, BN=BN, BK=BK)
    return y
