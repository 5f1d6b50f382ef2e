"""`triton_int4`: the portable int4 form on the GPU (or the CPU under TRITON_INTERPRET=1), `w4a16_matmul`."""
from __future__ import annotations

import torch

from .. import cpu
from ..linear import PackedLinear, _dequant_int4, register_layout


@register_layout
class TritonInt4Linear(PackedLinear):
    kernel, portable = "triton_int4", "int4"

    def load_tensors(self, t):
        self.register_buffer("qweight", t["qweight"].contiguous())
        self.register_buffer("scale", t["scale"].float().contiguous())
        self.register_buffer("zero", t["zero"].float().contiguous() if "zero" in t else None)
        self.group = None if self.w_spec.granularity == "channel" else self.w_spec.group_size

    def export_tensors(self):
        out = {} if self.bias is None else {"bias": self.bias}
        out["qweight"], out["scale"] = self.qweight, self.scale.to(torch.bfloat16)
        if not self.w_spec.symmetric:
            out["zero"] = self.zero.to(torch.bfloat16)
        return out

    def dequantized_weight(self):
        K = self.in_features
        return _dequant_int4(cpu.unpack_nibbles_raw(self.qweight), self.scale, self.zero, self.group or K, K)

    def matmul(self, x, out_dtype):
        from .. import triton_kernels as tk
        v, z, s = self.codes(x)
        xin = x if v is None else v - z
        xin = xin.to(torch.float32 if xin.device.type == "cpu" else torch.bfloat16)  # interpreter: no bf16 dot
        y = tk.w4a16_matmul(xin, self.qweight, self.scale, self.zero, self.group).float()
        return y if s is None else y.mul_(s)
