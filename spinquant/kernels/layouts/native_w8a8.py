"""`cpu_w8a8`: the `int8` layout on spinquant's own C kernel for few tokens (decode: per-token quantization fused
with an exact int32 GEMV), torch's `_int_mm` on the kernel's codes for many (prefill)."""
from __future__ import annotations

from .. import native
from ..linear import register_layout
from .torch_int8 import TorchInt8Linear

# below this many tokens our kernel, from it on torch's _int_mm on our codes (1B shapes, 2 threads, AVX-512: ours
# 1.6-2.0x at 16 tokens, 1.2-1.3x at 32, level at 48, _int_mm ahead at 64 and beyond except gate/up)
NATIVE_MAX_TOKENS = 48


@register_layout
class NativeW8A8Linear(TorchInt8Linear):
    kernel, portable = "cpu_w8a8", "int8"
    fuses_hadamard = True

    def matmul(self, x, out_dtype, hadamard=False):
        if x.shape[0] < NATIVE_MAX_TOKENS:
            return native.w8a8_linear(x, self.act_spec, self.w_int8, self.w_scale, self.colsum, out_dtype,
                                      hadamard=hadamard)
        # prefill: oneDNN's int8 GEMM on our codes, faster for many tokens
        c, s, zp = native.quant_act(x, self.act_spec, self.k_pad, hadamard=hadamard)
        return self.int_mm(c, zp[:, None], s[:, None])
