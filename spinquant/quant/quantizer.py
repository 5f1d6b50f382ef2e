"""Quantize / dequantize math shared by PTQ, activation/KV quantization and QAT.

Everything reduces over the last dimension: a tensor [..., n] is viewed as [..., n_groups, g] and each
group gets one (scale, zero). Codes live in [qmin, qmax]; `fake_quant` = dequantize(quantize(x)) with a
clipped straight-through estimator (gradient 1 inside the representable range, 0 outside) that is also
differentiable in `scale` (which is what LSQ-style learnable scales need).
"""
from __future__ import annotations

import torch

from .spec import QuantSpec


def group_view(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """[..., n] -> [..., n_groups, g] according to the granularity (tensor: one group of everything)."""
    if spec.granularity == "tensor":
        return x.reshape(1, -1)
    if spec.granularity == "group":
        spec.check_shape(x.shape[-1])
        return x.reshape(*x.shape[:-1], x.shape[-1] // spec.group_size, spec.group_size)
    return x.unsqueeze(-2)  # channel / token: one group per row


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() whose gradient is the identity. The forward is exactly round(x) (the usual (round(x) − x).detach()
    + x is off by an ulp where x is not representable after the subtraction), so fake quant during QAT and the
    converted integer model compute bit-identical weights."""
    return _RoundSTE.apply(x)


def qparams_from_range(xmin: torch.Tensor, xmax: torch.Tensor, spec: QuantSpec):
    """Scale and (float, integer-valued) zero point for ranges [xmin, xmax] (both include 0)."""
    if spec.symmetric:
        amax = torch.maximum(xmax.abs(), xmin.abs())
        scale = amax / spec.qmax
        zero = torch.zeros_like(scale)
    else:
        scale = (xmax - xmin) / spec.qmax
        zero = torch.round(-xmin / scale.clamp(min=torch.finfo(scale.dtype).tiny))
    if spec.scale_dtype is not None:  # the scale a runtime stores (GGUF fp16, XNNPACK bf16); codes use it
        scale = scale.to(getattr(torch, spec.scale_dtype)).to(scale.dtype)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero group (or below fp16): any scale works
    return scale, zero


def _minmax(xg: torch.Tensor, ratio: float | torch.Tensor = 1.0):
    xmin = xg.amin(dim=-1, keepdim=True).clamp(max=0) * ratio
    xmax = xg.amax(dim=-1, keepdim=True).clamp(min=0) * ratio
    return xmin, xmax


def fake_quant_grouped(xg: torch.Tensor, scale, zero, qmin: int, qmax: int) -> torch.Tensor:
    """dequant(quant(x)) on a grouped view; STE in x (clipped) and differentiable in scale (LSQ)."""
    q = torch.clamp(round_ste(xg / scale) + zero, qmin, qmax)
    return (q - zero) * scale


def compute_qparams(x: torch.Tensor, spec: QuantSpec, mse_grid: int = 80, mse_min_ratio: float = 0.2,
                    mse_norm: float = 2.0):
    """(scale, zero) for x, each shaped like the grouped view with a trailing 1: [..., n_groups, 1].

    With clip_search="mse" every group picks, among ratios clip_ratio·{1, 1-1/grid, ..., mse_min_ratio},
    the one with the smallest sum |fq(x)-x|^mse_norm (ratio 1 is always a candidate, so never worse).
    """
    with torch.no_grad():
        xg = group_view(x, spec).float()
        xmin, xmax = _minmax(xg, spec.clip_ratio)
        scale, zero = qparams_from_range(xmin, xmax, spec)
        if spec.clip_search == "mse":
            best = (fake_quant_grouped(xg, scale, zero, spec.qmin, spec.qmax) - xg).abs().pow(mse_norm).sum(-1, keepdim=True)
            n_steps = int(round(mse_grid * (1 - mse_min_ratio)))
            for i in range(1, n_steps + 1):
                r = 1 - i / mse_grid
                s, z = qparams_from_range(xmin * r, xmax * r, spec)
                err = (fake_quant_grouped(xg, s, z, spec.qmin, spec.qmax) - xg).abs().pow(mse_norm).sum(-1, keepdim=True)
                better = err < best
                best = torch.where(better, err, best)
                scale = torch.where(better, s, scale)
                zero = torch.where(better, z, zero)
    return scale, zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer codes (int8 storage, values in [qmin, qmax]) with x's shape."""
    xg = group_view(x, spec).float()
    q = torch.clamp(torch.round(xg / scale) + zero, spec.qmin, spec.qmax)
    return q.to(torch.int8 if spec.qmax <= 127 else torch.int16).reshape(x.shape)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    qg = group_view(q, spec).float()
    return ((qg - zero) * scale).reshape(q.shape).to(dtype)


class _FakeQuantSTE(torch.autograd.Function):
    """dequant(quant(x)) with the clipped STE gradient, saving only a boolean mask for backward (not the
    float32 intermediates autograd would keep): activation memory in training stays ~x's own size."""

    @staticmethod
    def forward(ctx, x, spec):
        scale, zero = compute_qparams(x.detach(), spec)
        xg = group_view(x, spec).float()
        v = torch.round(xg / scale) + zero
        inside = (v >= spec.qmin) & (v <= spec.qmax)
        ctx.save_for_backward(inside.reshape(x.shape))
        return ((v.clamp(spec.qmin, spec.qmax) - zero) * scale).reshape(x.shape).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None


def fake_quantize(x: torch.Tensor, spec: QuantSpec | None) -> torch.Tensor:
    """x -> dequant(quant(x)) with parameters computed from x itself (dynamic / RTN), clipped STE gradient
    (1 where x's code is inside [qmin, qmax], 0 where it clamps; none to the scale).

    Returns x unchanged when the spec is None or 16-bit, so W16A16 is exactly the FP model.
    """
    if spec is None or not spec.enabled:
        return x
    return _FakeQuantSTE.apply(x, spec)
