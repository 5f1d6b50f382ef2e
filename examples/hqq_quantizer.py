"""A new weight quantizer in one file: HQQ-style zero-point optimization (Badri & Shaji, "Half-Quadratic
Quantization", 2023), registered as `hqq`. Use it with its config (configs/quant/w4a16_hqq.yaml):

    python experiments/run.py quant=w4a16_hqq plugins=[examples/hqq_quantizer.py]

Round-to-nearest picks each group's zero point from the group's min and max. HQQ instead minimizes an
l_p (p < 1) reconstruction error, which outliers affect little, by half-quadratic splitting: alternate
a shrinkage step for the error E ≈ W - dequant(codes) and a closed-form update of the (fractional) zero
point, re-rounding the codes each time. No calibration data: `needs_hessian=False`.
"""
from __future__ import annotations

import torch

from spinquant.quant import QuantizedWeight, QuantSpec, register_weight_quantizer
from spinquant.quant.quantizer import compute_qparams, group_view


def _shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalized soft-thresholding: the proximal operator of |x|^p / beta."""
    return torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * x.abs().clamp(min=1e-8).pow(p - 1))


@register_weight_quantizer("hqq")
def hqq(weight: torch.Tensor, spec: QuantSpec, hessian=None, iters: int = 20, p: float = 0.7, beta: float = 10.0,
        kappa: float = 1.01) -> QuantizedWeight:
    """weight [out, in] -> codes [out, in] with min-max scales and l_p-optimized zeros [out, n_groups, 1]."""
    if spec.symmetric:
        raise ValueError("hqq optimizes zero points: use an asymmetric spec (quant.weight.symmetric=false)")
    spec.check_shape(weight.shape[-1], "weight")
    w = group_view(weight.detach(), spec).double()                    # [out, n_groups, g]
    scale, zero = (t.double() for t in compute_qparams(weight, spec))  # [out, n_groups, 1]
    def lp_error(z):
        codes = torch.clamp(torch.round(w / scale + z), spec.qmin, spec.qmax)
        return ((codes - z) * scale - w).abs().pow(p).sum(-1, keepdim=True)

    best_zero, best_err = zero.clone(), lp_error(zero)  # RTN's zero is a candidate: never worse than RTN
    for _ in range(iters):
        codes = torch.clamp(torch.round(w / scale + zero), spec.qmin, spec.qmax)
        err = _shrink_lp(w - (codes - zero) * scale, beta, p)
        zero = torch.mean(codes - (w - err) / scale, dim=-1, keepdim=True)
        beta *= kappa
        lp = lp_error(zero)  # keep each group's best zero
        best_zero = torch.where(lp < best_err, zero, best_zero)
        best_err = torch.minimum(lp, best_err)
    codes = torch.clamp(torch.round(w / scale + best_zero), spec.qmin, spec.qmax)
    dtype = torch.int8 if spec.qmax <= 127 else torch.int16
    return QuantizedWeight(codes.to(dtype).reshape(weight.shape), scale.float(), best_zero.float(), spec)
