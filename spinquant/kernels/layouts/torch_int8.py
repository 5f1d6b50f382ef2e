"""`int8`: symmetric per-channel int8 weights [N, K]; int8 per-token activations on `torch._int_mm` (exact int32)
from 16 tokens, `_weight_int8pack_mm` with dequantized activations below (decode) or for 16-bit inputs."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import cpu
from ..linear import INT_MM_MIN_TOKENS, PackedLinear, _ceil, _pad_k, choose_kernel, register_layout


@register_layout
class TorchInt8Linear(PackedLinear):
    kernel, portable = "int8", "int8"

    @classmethod
    def tensors_of(cls, ql):
        spec = ql.qweight.spec
        if choose_kernel(spec) != "int8":
            raise ValueError(f"kernel {cls.kernel} needs symmetric per-channel weights of 5-8 bits, got {spec.short()}")
        return super().tensors_of(ql)

    def load_tensors(self, t):
        """w [N, K] int8 codes, scale [N] (symmetric per-channel); K zero-padded for the ops."""
        w, scale = t["qweight"], t["scale"]
        N, K = w.shape
        self.k_pad = _ceil(K, cpu.INT8_K_MULTIPLE)
        self.register_buffer("w_int8", (F.pad(w, (0, self.k_pad - K)) if self.k_pad > K else w).contiguous())
        # per-row code sums for the activation zero-point correction, in row chunks: a whole-matrix int32 /
        # int64 copy of a 128K-vocabulary lm_head would be gigabytes of transient memory
        self.register_buffer("colsum", torch.cat([c.to(torch.int32).sum(1, dtype=torch.int32) for c in w.split(4096)]))
        self.register_buffer("w_scale", scale.float())
        self.register_buffer("w_scale_bf16", scale.to(torch.bfloat16), persistent=False)

    def int8_table(self):
        return self.w_int8

    def export_tensors(self):
        out = {} if self.bias is None else {"bias": self.bias}
        out["qweight"] = self.w_int8[:, :self.in_features].contiguous()
        out["scale"] = self.w_scale
        return out

    def dequantized_weight(self):
        return self.w_int8[:, :self.in_features].float() * self.w_scale[:, None]

    def int_mm(self, c: torch.Tensor, zp: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """int8 weights x int8 activation codes c [M, k_pad] (x = (c - zp)·s, zp int32 / s float32 [M, 1]) on
        `torch._int_mm`: exact int32 sums, the zero point removed through the row code sums -> float32 [M, N]."""
        acc = cpu.int8_int8_mm(c, self.w_int8.t()) - zp * self.colsum
        return acc.float() * s * self.w_scale

    def matmul(self, x, out_dtype):
        a = self.act_spec
        v, z, s = self.codes(x)
        if a is not None and a.bits <= 8 and x.shape[0] >= INT_MM_MIN_TOKENS:
            shift = -128 - a.qmin  # codes v + shift fit int8; x = (v + shift - (shift + zero))·s
            return self.int_mm(_pad_k((v + shift).to(torch.int8), self.k_pad), (z + shift).to(torch.int32), s)
        xin = x if v is None else (v - z) * s  # 16-bit activations, or too few tokens for _int_mm (decode)
        return cpu.int8_weight_mm(_pad_k(xin.to(torch.bfloat16), self.k_pad), self.w_int8, self.w_scale_bf16).float()
