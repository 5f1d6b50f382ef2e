"""`dequant`: the dequantized weight in bf16 and F.linear (any spec; the reference path)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..linear import PackedLinear, register_layout


@register_layout
class DequantLinear(PackedLinear):
    kernel, portable = "dequant", "dequant"

    def load_tensors(self, t):
        self.register_buffer("weight", t["weight"].to(torch.bfloat16))

    def export_tensors(self):
        return {**({} if self.bias is None else {"bias": self.bias}), "weight": self.weight}

    def dequantized_weight(self):
        return self.weight.float()

    def matmul(self, x, out_dtype):
        xin = self.quantized_input(x) if self.act_spec is not None else x
        return F.linear(xin.to(self.weight.dtype), self.weight).float()
