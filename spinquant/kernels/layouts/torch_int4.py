"""`int4`: torch's CPU int4 pack (`_weight_int4pack_mm_for_cpu`); activations enter as bf16 integer codes (exact,
|code| <= 255) with the per-token scale applied to the output."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import cpu
from ..linear import PackedLinear, _ceil, _pad_k, _portable_qweight, register_layout


@register_layout
class TorchInt4Linear(PackedLinear):
    kernel, portable = "int4", "int4"

    def load_tensors(self, t):
        u = cpu.unpack_nibbles_raw(t["qweight"])[:, :self.in_features].to(torch.int32)
        scale = t["scale"].float()
        zero = t["zero"].float() if "zero" in t else torch.zeros_like(scale)
        self._set(u, scale, zero)  # bf16 -> float32 -> bf16 is exact: the same kernel tensors as saved

    def _set(self, u: torch.Tensor, scale: torch.Tensor, zero_f: torch.Tensor) -> None:
        """u [N, K] unsigned 4-bit codes; scale, zero_f [N, G] with dequant = (u - 8)·scale + zero_f per group."""
        N, K = u.shape
        G = scale.shape[1]
        if G == 1:  # per-channel: pad K to a multiple of 32 and repeat the scale over kernel-sized groups
            self.k_pad = _ceil(K, 32)
            self.group = next(g for g in cpu.INT4_GROUPS if self.k_pad % g == 0)
        else:
            self.k_pad, self.group = K, K // G
        self.n_pad = _ceil(N, cpu.INT4_N_MULTIPLE)
        reps = self.reps = self.k_pad // self.group // G
        s = F.pad(scale.repeat_interleave(reps, 1), (0, 0, 0, self.n_pad - N), value=1.0)
        z = F.pad(zero_f.repeat_interleave(reps, 1), (0, 0, 0, self.n_pad - N))
        u = F.pad(u, (0, self.k_pad - K, 0, self.n_pad - N), value=8)  # padded inputs are zero anyway
        self.register_buffer("packed", cpu.pack_int4(u))
        self.register_buffer("scales_zeros", torch.stack([s.t(), z.t()], -1).to(torch.bfloat16).contiguous())

    def export_tensors(self):
        N, K = self.out_features, self.in_features
        out = {} if self.bias is None else {"bias": self.bias}
        out["qweight"] = _portable_qweight(cpu.unpack_int4(self.packed, self.n_pad, self.k_pad)[:N, :K])
        sz = self.scales_zeros[::self.reps, :N]  # one entry per spec group
        out["scale"] = sz[..., 0].t().contiguous()
        if not self.w_spec.symmetric:
            out["zero"] = sz[..., 1].t().contiguous()
        return out

    def dequantized_weight(self):
        N, K = self.out_features, self.in_features
        u = cpu.unpack_int4(self.packed, self.n_pad, self.k_pad).float()
        sz = self.scales_zeros.float()  # [K/g, N, 2]
        s = sz[..., 0].t().repeat_interleave(self.group, 1)
        zf = sz[..., 1].t().repeat_interleave(self.group, 1)
        return ((u - 8) * s + zf)[:N, :K]

    def matmul(self, x, out_dtype):
        v, z, s = self.codes(x)
        xin = _pad_k((x if v is None else v - z).to(torch.bfloat16), self.k_pad)
        y = cpu.int4_mm(xin, self.packed, self.group, self.scales_zeros)
        y = (y if self.n_pad == self.out_features else y[:, :self.out_features]).float()
        return y if s is None else y.mul_(s)
