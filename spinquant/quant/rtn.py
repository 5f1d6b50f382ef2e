"""Round-to-nearest weight quantization (optionally with the spec's MSE clip search)."""
from __future__ import annotations

import torch

from .quantizer import compute_qparams, quantize
from .registry import QuantizedWeight, register_weight_quantizer
from .spec import QuantSpec


@register_weight_quantizer("rtn")
def rtn(weight: torch.Tensor, spec: QuantSpec, hessian=None) -> QuantizedWeight:
    """weight [out, in] -> codes/scales by rounding each value to the nearest grid point."""
    spec.check_shape(weight.shape[-1], "weight")
    scale, zero = compute_qparams(weight, spec)
    return QuantizedWeight(quantize(weight, scale, zero, spec), scale, zero, spec)
