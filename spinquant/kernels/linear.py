"""Packed linear / embedding modules: weights held at their real bit-width, computed by real kernels.

`PackedLinear.from_quant_linear(ql)` takes a fake-quant `QuantLinear` (its integer codes and scales) and
picks a kernel for its spec:

| kernel  | weights                                   | activations             | op                           |
|---------|-------------------------------------------|-------------------------|------------------------------|
| `int4`  | <= 4 bits, per-channel or g32/64/128/256  | 16-bit, or int codes    | `_weight_int4pack_mm_for_cpu` |
| `int8`  | 5-8 bits, per-channel, symmetric          | int8 per-token, >= 16 tokens | `torch._int_mm` (exact int32) |
| `int8`  | 5-8 bits, per-channel, symmetric          | 16-bit, or < 16 tokens  | `_weight_int8pack_mm`         |
| `dequant` | anything else (the reference path)      | as the spec says        | dequantize + `F.linear`       |
| `triton_int4` | as `int4` (groups a multiple of 32)   | 16-bit, or int codes    | `triton_kernels.w4a16_matmul` |
| `triton_int8` | as `int8`                             | int8 per-token          | `triton_kernels.int8_matmul`  |
| `cpu_w4a8` | <= 4 bits, per-channel or groups of 8k  | <= 8-bit per-token      | `native.w4a8_linear` (VNNI)   |
| `cpu_w8a8` | as `int8`                             | <= 8-bit per-token      | `native.w8a8_linear` (VNNI)   |

The `cpu_*` kernels are spinquant's own C kernels (`native.py`, compiled on first use): per-token activation
quantization fused with an exact integer GEMM/GEMV (int4 weights row-tiled, int8 weights row-major as
`int8` holds them; >= 16 tokens go to `_int_mm` on the kernel's codes); the CPU backend picks them for
quantized activations where their AVX-512 VNNI path is built (`native.available()`), torch's ops otherwise.
The `triton_*` kernels (`pack(model, backend="triton")`) hold the portable layout of `export_tensors` and
run on a GPU (or on the CPU under TRITON_INTERPRET=1, which is how CI tests them).

Quantized activations are computed exactly as the fake-quant path does (same per-token scales and
codes); with int4 weights the integer codes enter the kernel as bf16 (exact: |code| <= 255) and the
per-token scale is applied to the output. Odd shapes are zero-padded to what the ops accept.
`reference(x)` recomputes the same function densely in float32 (what the tests compare against).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quant.linear import QuantEmbedding, QuantLinear
from ..quant.quantizer import compute_qparams
from ..quant.spec import QuantSpec
from . import cpu, native

KERNELS = ("int4", "int8", "dequant", "triton_int4", "triton_int8", "cpu_w4a8", "cpu_w8a8")
# the saved form of the Triton and native kernels' weights
PORTABLE = {"triton_int4": "int4", "triton_int8": "int8", "cpu_w4a8": "int4", "cpu_w8a8": "int8"}
NATIVE = ("cpu_w4a8", "cpu_w8a8")  # spinquant's own C kernels (native.py)
INT_MM_MIN_TOKENS = 16  # below this many tokens (decode) int8 weights run through _weight_int8pack_mm instead


def _ceil(n: int, m: int) -> int:
    return -(-n // m) * m


def token_codes(x: torch.Tensor, spec: QuantSpec):
    """Per-token codes of x [M, K] under `spec`, exactly as `fake_quantize` computes them: (v, zero, scale), v
    float integer-valued in [qmin, qmax] [M, K], zero and scale [M, 1]; x ≈ (v - zero)·scale.

    The per-token case (every activation spec of the presets) takes a lean path with the same float
    operations as `compute_qparams` in the same order (bit-identical), in fewer, in-place ops: at decode
    time these small ops, not the matmuls, are what the quantized activations cost."""
    xf = x.float()
    if spec.granularity not in ("token", "channel") or spec.clip_search != "none":
        scale, zero = compute_qparams(xf, spec)
        scale, zero = scale.reshape(-1, 1), zero.reshape(-1, 1)
    else:
        xmin, xmax = torch.aminmax(xf, dim=-1, keepdim=True)
        xmin, xmax = xmin.clamp_(max=0), xmax.clamp_(min=0)
        if spec.clip_ratio != 1.0:
            xmin, xmax = xmin.mul_(spec.clip_ratio), xmax.mul_(spec.clip_ratio)
        if spec.symmetric:
            scale = torch.maximum(xmax.abs(), xmin.abs()).div_(spec.qmax)
            zero = torch.zeros_like(scale)
        else:
            scale = (xmax - xmin).div_(spec.qmax)
            zero = torch.round(-xmin / scale.clamp(min=torch.finfo(scale.dtype).tiny))
        scale = torch.where(scale > 0, scale, 1.0)
    v = (xf / scale).round_().add_(zero).clamp_(spec.qmin, spec.qmax)
    return v, zero, scale


def _pad_k(x: torch.Tensor, k_pad: int) -> torch.Tensor:
    """Zero-pad the last dimension to k_pad (no copy when it already is k_pad)."""
    return x if x.shape[-1] == k_pad else F.pad(x, (0, k_pad - x.shape[-1]))


def choose_kernel(w_spec: QuantSpec, act_spec: QuantSpec | None = None, backend: str = "cpu") -> str:
    """The kernel a weight spec runs on (table above); on the CPU activation specs work with every kernel."""
    if backend not in ("cpu", "triton"):
        raise ValueError(f"unknown kernel backend {backend!r}; available: cpu, triton")
    if not w_spec.enabled:
        return "dequant"
    if backend == "triton":
        cpu_kernel = choose_kernel(w_spec)
        if cpu_kernel == "int4" and (w_spec.granularity == "channel" or w_spec.group_size % 32 == 0):
            return "triton_int4"
        a8 = act_spec is not None and act_spec.enabled and act_spec.bits <= 8 and act_spec.granularity == "token"
        return "triton_int8" if cpu_kernel == "int8" and a8 else "dequant"
    int4 = w_spec.bits <= 4 and w_spec.granularity in ("channel", "group")
    int8 = 4 < w_spec.bits <= 8 and w_spec.granularity == "channel" and w_spec.symmetric
    if native.supports_act(act_spec) and (int4 or int8) and native.available():
        if int4 and (w_spec.granularity == "channel" or w_spec.group_size % 8 == 0):
            return "cpu_w4a8"
        if int8:
            return "cpu_w8a8"
    if int4 and (w_spec.granularity == "channel" or w_spec.group_size in cpu.INT4_GROUPS):
        return "int4"
    return "int8" if int8 else "dequant"


def load_kernel(portable: str, w_spec: QuantSpec, act_spec: QuantSpec | None) -> str:
    """The CPU kernel a saved module (portable kernel name) runs on here: the native one where it applies."""
    here = choose_kernel(w_spec, act_spec)
    return here if portable in ("int4", "int8") and here in NATIVE else portable


def _codes_scale_zero(ql: QuantLinear):
    """ql's integer codes int32 [N, K] and scale / zero float32 [N, groups] (a per-tensor spec broadcast)."""
    qw, N = ql.qweight, ql.out_features
    codes, scale, zero = qw.codes.to(torch.int32), qw.scale.float().reshape(N, -1), qw.zero.float().reshape(N, -1)
    if qw.spec.granularity == "tensor":
        scale, zero = scale.expand(N, 1), zero.expand(N, 1)
    return codes, scale, zero


def _int4_form(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec):
    """The unsigned int4 form every int4 kernel uses: u = code + off in [0, 15], centred on 8 so that the
    float zero z = (8 - zero - off)·scale stays small, and w = (u - 8)·scale + z per group."""
    off = 8 if spec.symmetric else 8 - 2 ** (spec.bits - 1)
    return codes + off, (8 - zero - off) * scale


def _portable_qweight(u: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit codes [N, K] -> the saved layout uint8 [N, ceil(K/2)] (an odd K padded with code 8)."""
    return cpu.pack_nibbles_raw(F.pad(u, (0, u.shape[1] % 2), value=8).to(torch.uint8))


def _portable_tensors(ql: QuantLinear, kernel: str) -> dict[str, torch.Tensor]:
    """`PackedLinear.export_tensors()` of `ql` packed for `kernel` ("int4" / "int8"), computed directly from its
    codes (no CPU-only packing op)."""
    codes, scale, zero = _codes_scale_zero(ql)
    out = {} if ql.bias is None else {"bias": ql.bias.detach().to(torch.bfloat16)}
    if kernel == "int8":
        out.update(qweight=codes.to(torch.int8).contiguous(), scale=scale[:, 0].contiguous())
        return out
    u, zero_f = _int4_form(codes, scale, zero, ql.qweight.spec)
    out.update(qweight=_portable_qweight(u), scale=scale.to(torch.bfloat16).contiguous())
    if not ql.qweight.spec.symmetric:
        out["zero"] = zero_f.to(torch.bfloat16).contiguous()
    return out


def _dequant_int4(u: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int, K: int) -> torch.Tensor:
    """Unsigned 4-bit codes u [N, >= K] with scale / zero [N, G] (zero None: 0) -> w = (u - 8)·scale + zero,
    float32 [N, K], each group of `group` columns sharing its scale and zero."""
    w = (u[:, :K].float() - 8) * scale.float().repeat_interleave(group, 1)[:, :K]
    return w if zero is None else w + zero.float().repeat_interleave(group, 1)[:, :K]


class PackedLinear(nn.Module):
    """y = W_q · a + b with a real low-bit kernel; x [..., in] -> y [..., out] (x's dtype).

    Buffers depend on the kernel (see the module docstring); `export_tensors()` / `from_export()` give the
    portable form that `spinquant.export` writes.
    """

    def __init__(self, in_features: int, out_features: int, w_spec: QuantSpec, act_spec: QuantSpec | None,
                 kernel: str, bias: torch.Tensor | None = None):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; available: {KERNELS}")
        self.in_features, self.out_features = in_features, out_features
        self.w_spec, self.kernel = w_spec, kernel
        self.act_spec = act_spec if act_spec is not None and act_spec.enabled else None
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16).clone())
        self.input_transform: nn.Module | None = None
        self.adapter: nn.Module | None = None
        self.group = self.k_pad = self.n_pad = None

    # ---- building ---------------------------------------------------------------------------------
    @classmethod
    def from_quant_linear(cls, ql: QuantLinear, kernel: str | None = None, backend: str = "cpu") -> "PackedLinear":
        qw = ql.qweight
        if qw is None:
            raise ValueError(f"{ql} has no quantized weight to pack (16-bit linears stay nn.Linear)")
        spec = qw.spec
        kernel = kernel or choose_kernel(spec, ql.act_spec, backend)
        if kernel in PORTABLE:  # built from the portable form of export_tensors (scales rounded to bf16 as saved)
            return cls.from_export(_portable_tensors(ql, PORTABLE[kernel]), ql.in_features, ql.out_features, spec,
                                   ql.act_spec, kernel, ql.input_transform, ql.adapter)
        m = cls(ql.in_features, ql.out_features, spec, ql.act_spec, kernel, ql.bias)
        codes, scale, zero = _codes_scale_zero(ql)
        if kernel == "int4":
            u, zero_f = _int4_form(codes, scale, zero, spec)
            m._set_int4(u, scale, zero_f)
        elif kernel == "int8":
            if choose_kernel(spec) != "int8":
                raise ValueError(f"kernel int8 needs symmetric per-channel weights of 5-8 bits, got {spec.short()}")
            m._set_int8(codes.to(torch.int8), scale[:, 0])
        else:
            m.register_buffer("weight", qw.dequantize(torch.float32).to(torch.bfloat16))
        m.input_transform = ql.input_transform
        m.adapter = ql.adapter
        return m

    def _set_int4(self, u: torch.Tensor, scale: torch.Tensor, zero_f: torch.Tensor) -> None:
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

    def _set_native_int4(self, u: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> None:
        """u [N, K] unsigned 4-bit codes; scale, zero bf16 [N, G] (zero None: symmetric) -> the native tiles.
        Per-channel weights pad K to a multiple of 8 and use one group of k_pad; padded rows / columns get
        code 8, scale 1 and zero 0. rsum [N] = sum_k of the dequantized row (padding included), from per-group
        code sums: no float copy of the weight (loading a 1B model stays within its packed size)."""
        N, K = u.shape
        G = scale.shape[1]
        self.k_pad = _ceil(K, 8) if G == 1 else K
        self.group, self.n_pad = self.k_pad // G, _ceil(N, native.TILE)
        rows = self.n_pad - N
        u = F.pad(u.to(torch.uint8), (0, self.k_pad - K, 0, rows), value=8)
        scale = F.pad(scale, (0, 0, 0, rows), value=1.0)
        usum = u.view(self.n_pad, G, self.group).sum(-1, dtype=torch.int32) - 8 * self.group  # sum (u - 8)
        rsum = usum.double() * scale.double()
        if zero is not None:
            zero = F.pad(zero, (0, 0, 0, rows))
            rsum += zero.double() * self.group
        self.register_buffer("tiles", native.tile_int4(u))
        self.register_buffer("tile_scales", native.tile_groups(scale))
        self.register_buffer("tile_zeros", None if zero is None else native.tile_groups(zero))
        self.register_buffer("rsum", rsum.sum(1).float())

    def int8_table(self) -> torch.Tensor | None:
        """The int8 weight table a tied embedding can share (int8 kernels), else None."""
        return self.w_int8 if self.kernel in ("int8", "cpu_w8a8") else None

    def _native_codes(self) -> torch.Tensor:
        """cpu_w4a8's unsigned codes untiled, uint8 [n_pad, k_pad]."""
        return native.untile_int4(self.tiles)

    def _native_groups(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """cpu_w4a8 scale / zero bf16 [N, G], as the spec groups them."""
        def untile(t):
            return t.transpose(1, 2).reshape(self.n_pad, -1)[:self.out_features]
        return untile(self.tile_scales), None if self.tile_zeros is None else untile(self.tile_zeros)

    def _set_int8(self, w: torch.Tensor, scale: torch.Tensor) -> None:
        """w [N, K] int8 codes, scale [N] (symmetric per-channel); K zero-padded for the ops."""
        N, K = w.shape
        self.k_pad = _ceil(K, cpu.INT8_K_MULTIPLE)
        self.register_buffer("w_int8", (F.pad(w, (0, self.k_pad - K)) if self.k_pad > K else w).contiguous())
        # per-row code sums for the activation zero-point correction, in row chunks: a whole-matrix int32 /
        # int64 copy of a 128K-vocabulary lm_head would be gigabytes of transient memory
        self.register_buffer("colsum", torch.cat([c.to(torch.int32).sum(1, dtype=torch.int32) for c in w.split(4096)]))
        self.register_buffer("w_scale", scale.float())
        self.register_buffer("w_scale_bf16", scale.to(torch.bfloat16), persistent=False)

    # ---- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel in NATIVE:
            return self._native_forward(x)
        shape, dtype = x.shape, x.dtype
        a = self.act_spec
        v = z = s = None
        if self.input_transform is not None:
            x = self.input_transform(x.reshape(-1, self.in_features))
            if a is not None:
                v, z, s = token_codes(x, a)
        else:
            if a is not None:
                v, z, s = token_codes(x.reshape(-1, self.in_features), a)  # per call: nothing cached across calls
            x = x.reshape(-1, self.in_features)
        if self.kernel == "int4":
            xin = (v - z) if a is not None else x
            xin = _pad_k(xin.to(torch.bfloat16), self.k_pad)
            y = cpu.int4_mm(xin, self.packed, self.group, self.scales_zeros)
            y = (y if self.n_pad == self.out_features else y[:, :self.out_features]).float()
            if a is not None:
                y = y.mul_(s)
        elif self.kernel == "triton_int4":
            from . import triton_kernels as tk
            xin = (v - z) if a is not None else x
            xin = xin.to(torch.float32 if xin.device.type == "cpu" else torch.bfloat16)  # interpreter: no bf16 dot
            y = tk.w4a16_matmul(xin, self.qweight, self.scale, self.zero, self.group).float()
            if a is not None:
                y = y.mul_(s)
        elif self.kernel == "triton_int8":
            from . import triton_kernels as tk
            shift = -128 - a.qmin
            y = tk.int8_matmul((v + shift).to(torch.int8), self.qweight, s, self.scale, z + shift)
        elif self.kernel == "int8" and a is not None and a.bits <= 8 and x.shape[0] >= INT_MM_MIN_TOKENS:
            shift = -128 - a.qmin  # codes v + shift fit int8; x = (v + shift - (shift + zero))·s
            y = self._int_mm(_pad_k((v + shift).to(torch.int8), self.k_pad), (z + shift).to(torch.int32), s)
        elif self.kernel == "int8":  # 16-bit activations, or too few tokens for _int_mm to pay off (decode)
            xin = ((v - z) * s) if a is not None else x
            y = cpu.int8_weight_mm(_pad_k(xin.to(torch.bfloat16), self.k_pad), self.w_int8, self.w_scale_bf16).float()
        else:
            xin = ((v - z) * s) if a is not None else x
            y = F.linear(xin.to(self.weight.dtype), self.weight).float()
        if self.bias is not None:
            y = y + self.bias.float()
        if self.adapter is not None:
            y = y + self.adapter(((v - z) * s) if a is not None else x.float()).float()
        return y.to(dtype).reshape(*shape[:-1], self.out_features)

    def _native_forward(self, x: torch.Tensor) -> torch.Tensor:
        """cpu_w4a8 / cpu_w8a8: one C call quantizes x per token and multiplies (bf16 out when nothing follows)."""
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, self.in_features)
        if self.input_transform is not None:
            x = self.input_transform(x)
        direct = self.bias is None and self.adapter is None
        out_dtype = dtype if direct and dtype in (torch.bfloat16, torch.float32) else torch.float32
        if self.kernel == "cpu_w4a8":
            y = native.w4a8_linear(x, self.act_spec, self.tiles, self.tile_scales, self.tile_zeros, self.rsum,
                                   self.out_features, self.group, out_dtype)
        elif x.shape[0] < INT_MM_MIN_TOKENS:
            y = native.w8a8_linear(x, self.act_spec, self.w_int8, self.w_scale, self.colsum, out_dtype)
        else:  # prefill: the same exact int32 sums on torch's int8 GEMM (oneDNN), faster than ours for many tokens
            c, s, zp = native.quant_act(x, self.act_spec, self.k_pad)
            y = self._int_mm(c, zp[:, None], s[:, None])
        if self.bias is not None:
            y = y + self.bias.float()
        if self.adapter is not None:
            v, z, s = token_codes(x, self.act_spec)
            y = y + self.adapter((v - z) * s).float()
        return y.to(dtype).reshape(*shape[:-1], self.out_features)

    def _int_mm(self, c: torch.Tensor, zp: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """int8 weights x int8 activation codes c [M, k_pad] (x = (c - zp)·s, zp int32 / s float32 [M, 1]) on
        `torch._int_mm`: exact int32 sums, the zero point removed through the row code sums -> float32 [M, N]."""
        acc = cpu.int8_int8_mm(c, self.w_int8.t()) - zp * self.colsum
        return acc.float() * s * self.w_scale

    def weight_buffers(self) -> list[torch.Tensor]:
        """The buffers a matmul reads as weights (codes, scales; not the derived row sums or bf16 scale copy)."""
        return [b for n, b in self.named_buffers(recurse=False)
                if b is not None and n not in ("bias", "colsum", "w_scale_bf16", "rsum")]

    @property
    def portable_kernel(self) -> str:
        """The kernel name the saved form records (Triton kernels save as their CPU counterparts)."""
        return PORTABLE.get(self.kernel, self.kernel)

    # ---- the portable form ------------------------------------------------------------------------
    def export_tensors(self) -> dict[str, torch.Tensor]:
        """Device- and layout-independent tensors (what `spinquant.export` writes), weights at their bit-width:
        int4: qweight uint8 [out, ceil(in/2)] (two codes a byte, low nibble first; u = code + 8 - offset),
        scale bf16 [out, groups] and, if asymmetric, zero bf16 [out, groups] with w = (u - 8)·scale + zero;
        int8: qweight int8 [out, in], scale float32 [out]; dequant: weight bf16 [out, in]."""
        N, K = self.out_features, self.in_features
        out = {} if self.bias is None else {"bias": self.bias}
        if self.kernel in ("triton_int4", "triton_int8"):
            out["qweight"], out["scale"] = self.qweight, self.scale.to(torch.bfloat16 if self.kernel == "triton_int4"
                                                                        else torch.float32)
            if self.kernel == "triton_int4" and not self.w_spec.symmetric:
                out["zero"] = self.zero.to(torch.bfloat16)
            return out
        if self.kernel == "cpu_w4a8":
            out["qweight"] = _portable_qweight(self._native_codes()[:N, :K])
            out["scale"], zero = self._native_groups()
            if zero is not None:
                out["zero"] = zero
        elif self.kernel == "int4":
            out["qweight"] = _portable_qweight(cpu.unpack_int4(self.packed, self.n_pad, self.k_pad)[:N, :K])
            sz = self.scales_zeros[::self.reps, :N]  # one entry per spec group
            out["scale"] = sz[..., 0].t().contiguous()
            if not self.w_spec.symmetric:
                out["zero"] = sz[..., 1].t().contiguous()
        elif self.kernel in ("int8", "cpu_w8a8"):
            out["qweight"] = self.w_int8[:, :K].contiguous()
            out["scale"] = self.w_scale
        else:
            out["weight"] = self.weight
        return out

    @classmethod
    def from_export(cls, t: dict[str, torch.Tensor], in_features: int, out_features: int, w_spec: QuantSpec,
                    act_spec: QuantSpec | None, kernel: str, input_transform=None, adapter=None) -> "PackedLinear":
        """Inverse of `export_tensors` (shapes already checked by the caller)."""
        m = cls(in_features, out_features, w_spec, act_spec, kernel, t.get("bias"))
        m.input_transform, m.adapter = input_transform, adapter
        K = in_features
        if kernel == "triton_int4":
            m.register_buffer("qweight", t["qweight"].contiguous())
            m.register_buffer("scale", t["scale"].float().contiguous())
            m.register_buffer("zero", t["zero"].float().contiguous() if "zero" in t else None)
            m.group = None if w_spec.granularity == "channel" else w_spec.group_size
        elif kernel == "triton_int8":
            m.register_buffer("qweight", t["qweight"].contiguous())
            m.register_buffer("scale", t["scale"].float().contiguous())
        elif kernel in ("int4", "cpu_w4a8"):
            u = cpu.unpack_nibbles_raw(t["qweight"])[:, :K]
            if kernel == "cpu_w4a8":
                m._set_native_int4(u, t["scale"].to(torch.bfloat16), t["zero"].to(torch.bfloat16) if "zero" in t else None)
            else:
                u = u.to(torch.int32)
                scale = t["scale"].float()
                zero = t["zero"].float() if "zero" in t else torch.zeros_like(scale)
                m._set_int4(u, scale, zero)  # bf16 -> float32 -> bf16 is exact: the same kernel tensors as saved
        elif kernel in ("int8", "cpu_w8a8"):
            m._set_int8(t["qweight"], t["scale"])
        else:
            m.register_buffer("weight", t["weight"].to(torch.bfloat16))
        return m

    def dequantized_weight(self) -> torch.Tensor:
        """The weight this module multiplies by, float32 [out, in] (what the kernel computes with)."""
        N, K = self.out_features, self.in_features
        if self.kernel == "triton_int4":
            return _dequant_int4(cpu.unpack_nibbles_raw(self.qweight), self.scale, self.zero, self.group or K, K)
        if self.kernel == "triton_int8":
            return self.qweight.float() * self.scale[:, None]
        if self.kernel == "cpu_w4a8":
            return _dequant_int4(self._native_codes()[:N], *self._native_groups(), self.group, K)
        if self.kernel == "int4":
            u = cpu.unpack_int4(self.packed, self.n_pad, self.k_pad).float()
            sz = self.scales_zeros.float()  # [K/g, N, 2]
            s = sz[..., 0].t().repeat_interleave(self.group, 1)
            zf = sz[..., 1].t().repeat_interleave(self.group, 1)
            return ((u - 8) * s + zf)[:N, :K]
        if self.kernel in ("int8", "cpu_w8a8"):
            return self.w_int8[:, :K].float() * self.w_scale[:, None]
        return self.weight.float()

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same function in float32 with a dense dequantized weight (no kernel)."""
        x = x.reshape(-1, self.in_features).float()
        if self.input_transform is not None:
            x = self.input_transform(x)
        if self.act_spec is not None:
            v, z, s = token_codes(x, self.act_spec)
            x = (v - z) * s
        y = x @ self.dequantized_weight().t()
        if self.bias is not None:
            y = y + self.bias.float()
        if self.adapter is not None:
            y = y + self.adapter(x).float()
        return y

    def extra_repr(self) -> str:
        a = self.act_spec.short() if self.act_spec else "16-bit"
        return f"in={self.in_features}, out={self.out_features}, w={self.w_spec.short()}, a={a}, kernel={self.kernel}"


class PackedEmbedding(nn.Module):
    """Embedding table stored as int8 codes [V, D] with per-row scale (and zero): ids -> rows [..., D].

    Storage form: codes int8, rows = (codes - zero)·scale; asymmetric codes are shifted into int8's range
    by `from_codes` (zero shifted alike)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec,
                 dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if spec.granularity not in ("channel", "tensor"):
            raise ValueError(f"packed embedding needs a per-row (channel) spec, got {spec.short()}")
        if codes.dtype != torch.int8:
            raise ValueError(f"packed embedding codes must be int8 (storage form), got {codes.dtype}")
        self.spec, self.dtype = spec, dtype
        self.num_embeddings, self.embedding_dim = codes.shape
        V = codes.shape[0]
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale.reshape(-1, 1).float().expand(V, 1).contiguous())
        self.register_buffer("zero", None if zero is None else zero.reshape(-1, 1).float().expand(V, 1).contiguous())

    @classmethod
    def from_codes(cls, codes, scale, zero, spec: QuantSpec, dtype=torch.bfloat16) -> "PackedEmbedding":
        """From quantizer output: codes in [qmin, qmax] (any int dtype), zero None when symmetric."""
        off = -(spec.qmin + 2 ** (spec.bits - 1))  # asymmetric codes [0, 2^b) are shifted into int8's range
        if spec.symmetric != (zero is None):
            raise ValueError("zero points are needed exactly when the embedding spec is asymmetric")
        return cls((codes.to(torch.int32) + off).to(torch.int8), scale, None if zero is None else zero.float() + off,
                   spec, dtype)

    @classmethod
    def from_quant_embedding(cls, qe: QuantEmbedding, dtype=torch.bfloat16) -> "PackedEmbedding":
        qw = qe.qweight
        return cls.from_codes(qw.codes, qw.scale, None if qw.spec.symmetric else qw.zero, qw.spec, dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.codes).float()
        if self.zero is not None:
            rows = rows - F.embedding(ids, self.zero)
        return (rows * F.embedding(ids, self.scale)).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.spec.short()}"
