"""Registry of weight quantizers: `@register_weight_quantizer("name")` is all a new method needs.

A weight quantizer is a function `fn(weight [out, in], spec, hessian=None, **options) -> QuantizedWeight`.
Declare `needs_hessian=True` to receive H = 2/n · Σ xᵀx of the layer's calibration inputs ([in, in],
float32); `spinquant.quant.apply` collects it layer by layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .quantizer import dequantize
from .spec import QuantSpec


@dataclass
class QuantizedWeight:
    """Integer codes [out, in] plus per-group scale/zero [out, n_groups, 1] (or [1, 1, 1] per-tensor)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    spec: QuantSpec

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero, self.spec, dtype)


@dataclass(frozen=True)
class WeightQuantizer:
    name: str
    fn: Callable[..., QuantizedWeight]
    needs_hessian: bool = False


WEIGHT_QUANTIZERS: dict[str, WeightQuantizer] = {}


def register_weight_quantizer(name: str, needs_hessian: bool = False):
    """Decorator: register `fn(weight, spec, hessian=None, **options) -> QuantizedWeight` under `name`."""

    def deco(fn):
        old = WEIGHT_QUANTIZERS.get(name)
        if old is not None and _source(old.fn) != _source(fn):  # the same file imported again is fine
            raise ValueError(f"weight quantizer {name!r} is already registered (by {_source(old.fn)[0]})")
        WEIGHT_QUANTIZERS[name] = WeightQuantizer(name, fn, needs_hessian)
        return fn

    return deco


def _source(fn) -> tuple[str, str]:
    return fn.__code__.co_filename, fn.__qualname__


def get_weight_quantizer(name: str) -> WeightQuantizer:
    if name not in WEIGHT_QUANTIZERS:
        raise KeyError(f"unknown weight quantizer {name!r}; registered: {sorted(WEIGHT_QUANTIZERS)}. "
                       f"Add one with @spinquant.quant.register_weight_quantizer")
    return WEIGHT_QUANTIZERS[name]
