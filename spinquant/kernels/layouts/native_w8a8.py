"""`cpu_w8a8`: the `int8` layout on spinquant's own C kernel for few tokens (decode: per-token quantization fused
with an exact int32 GEMV), torch's `_int_mm` on the kernel's codes for many (prefill)."""
from __future__ import annotations

from .. import native
from ..linear import INT_MM_MIN_TOKENS, register_layout
from .torch_int8 import TorchInt8Linear


@register_layout
class NativeW8A8Linear(TorchInt8Linear):
    kernel, portable = "cpu_w8a8", "int8"
    fuses_hadamard = True

    def matmul(self, x, out_dtype, hadamard=False):
        if x.shape[0] < INT_MM_MIN_TOKENS:
            return native.w8a8_linear(x, self.act_spec, self.w_int8, self.w_scale, self.colsum, out_dtype,
                                      hadamard=hadamard)
        # prefill: oneDNN's int8 GEMM on our codes, faster for many tokens
        c, s, zp = native.quant_act(x, self.act_spec, self.k_pad, hadamard=hadamard)
        return self.int_mm(c, zp[:, None], s[:, None])
