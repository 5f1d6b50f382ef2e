"""What spinquant knows about a model it changed, in one typed place: `model.spinquant`, a `ModelState`.

Rotation, quantization, packing and loading record here (and nowhere else on the model), so "is it already rotated /
quantized?", the packed compute dtype and what a packed checkpoint saves are read from one object. Per-module hooks
(an attention's `qk_transform` / `kv_quantizer`, a linear's `input_transform`) stay on their modules.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

ATTR = "spinquant"


@dataclass
class ModelState:
    rotation: Any = None                     # spinquant.rotation.RotationState: what rotated it (None: not rotated)
    quant: Any = None                        # spinquant.quant.QuantConfig it is quantized with; None: not quantized
    packed_dtype: torch.dtype | None = None  # compute dtype of its packed kernels (kernels.pack, export.load_packed)


def state_of(model) -> ModelState:
    """The model's ModelState, created empty on first use."""
    st = getattr(model, ATTR, None)
    if st is None:
        st = ModelState()
        setattr(model, ATTR, st)
    elif not isinstance(st, ModelState):
        raise TypeError(f"model.{ATTR} is a {type(st).__name__}, not spinquant's ModelState: another library uses "
                        f"the attribute name")
    return st
