"""`triton_int8`: the portable int8 form with int8 per-token activations on the GPU (or the interpreter),
`int8_matmul` (exact int32 sums)."""
from __future__ import annotations

import torch

from ..linear import PackedLinear, register_layout


@register_layout
class TritonInt8Linear(PackedLinear):
    kernel, portable = "triton_int8", "int8"

    def load_tensors(self, t):
        self.register_buffer("qweight", t["qweight"].contiguous())
        self.register_buffer("scale", t["scale"].float().contiguous())

    def export_tensors(self):
        out = {} if self.bias is None else {"bias": self.bias}
        out["qweight"], out["scale"] = self.qweight, self.scale.to(torch.float32)
        return out

    def dequantized_weight(self):
        return self.qweight.float() * self.scale[:, None]

    def matmul(self, x, out_dtype):
        from .. import triton_kernels as tk
        v, z, s = self.codes(x)
        shift = -128 - self.act_spec.qmin
        return tk.int8_matmul((v + shift).to(torch.int8), self.qweight, s, self.scale, z + shift)
