"""`cpu_w4a8`: int4 weights in row tiles for spinquant's own C kernel (AVX-512 VNNI, portable C loops otherwise):
per-token activation quantization fused with exact integer sums per group (see csrc/lowbit.c)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import cpu, native
from ..linear import PackedLinear, _ceil, _dequant_int4, _portable_qweight, register_layout


@register_layout
class NativeW4A8Linear(PackedLinear):
    kernel, portable = "cpu_w4a8", "int4"
    fuses_hadamard = True

    def load_tensors(self, t):
        """u [N, K] unsigned 4-bit codes; scale, zero bf16 [N, G] (zero None: symmetric) -> the native tiles.
        Per-channel weights pad K to a multiple of 8 and use one group of k_pad; padded rows / columns get
        code 8, scale 1 and zero 0. rsum [N] = sum_k of the dequantized row (padding included), from per-group
        code sums: no float copy of the weight. Built in blocks of rows, so that loading a 128K-row lm_head holds
        no unpacked copy of the whole matrix."""
        scale = t["scale"].to(torch.bfloat16)
        zero = t["zero"].to(torch.bfloat16) if "zero" in t else None
        N, K, G = self.out_features, self.in_features, scale.shape[1]
        self.k_pad = _ceil(K, 8) if G == 1 else K
        self.group, self.n_pad = self.k_pad // G, _ceil(N, native.TILE)
        rows = self.n_pad - N
        scale = F.pad(scale, (0, 0, 0, rows), value=1.0)
        zero = None if zero is None else F.pad(zero, (0, 0, 0, rows))
        tiles = torch.empty(self.n_pad // native.TILE, self.k_pad // 8, native.TILE, 4, dtype=torch.uint8)
        usum = torch.empty(self.n_pad, G, dtype=torch.int32)
        step = 256 * native.TILE
        for n0 in range(0, self.n_pad, step):
            n1 = min(n0 + step, self.n_pad)
            u = cpu.unpack_nibbles_raw(t["qweight"][n0:min(n1, N)])[:, :K]
            u = F.pad(u, (0, self.k_pad - K, 0, n1 - n0 - u.shape[0]), value=8)
            usum[n0:n1] = u.view(n1 - n0, G, self.group).sum(-1, dtype=torch.int32) - 8 * self.group  # sum (u - 8)
            tiles[n0 // native.TILE:n1 // native.TILE] = native.tile_int4(u)
        rsum = usum.double() * scale.double()
        if zero is not None:
            rsum += zero.double() * self.group
        self.register_buffer("tiles", tiles)
        self.register_buffer("tile_scales", native.tile_groups(scale))
        self.register_buffer("tile_zeros", None if zero is None else native.tile_groups(zero))
        self.register_buffer("rsum", rsum.sum(1).float())

    def _groups(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """scale / zero bf16 [N, G], as the spec groups them."""
        def untile(t):
            return t.transpose(1, 2).reshape(self.n_pad, -1)[:self.out_features]
        return untile(self.tile_scales), None if self.tile_zeros is None else untile(self.tile_zeros)

    def export_tensors(self):
        N, K = self.out_features, self.in_features
        out = {} if self.bias is None else {"bias": self.bias}
        out["qweight"] = _portable_qweight(native.untile_int4(self.tiles)[:N, :K])
        out["scale"], zero = self._groups()
        if zero is not None:
            out["zero"] = zero
        return out

    def dequantized_weight(self):
        return _dequant_int4(native.untile_int4(self.tiles)[:self.out_features], *self._groups(), self.group,
                             self.in_features)

    def matmul(self, x, out_dtype, hadamard=False):
        return native.w4a8_linear(x, self.act_spec, self.tiles, self.tile_scales, self.tile_zeros, self.rsum,
                                  self.out_features, self.group, out_dtype, hadamard=hadamard)
