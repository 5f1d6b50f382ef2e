"""Packed linear / embedding modules: weights held at their real bit-width, computed by real kernels.

`PackedLinear.from_quant_linear(ql)` takes a fake-quant `QuantLinear` (its integer codes and scales) and
picks a kernel for its spec; each kernel is one `PackedLinear` subclass in `layouts/` (registered by name):

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
`int8` holds them; from 48 tokens on `cpu_w8a8` hands `_int_mm` the kernel's codes); the CPU backend picks them
for quantized activations where a vector path is built (AVX-512 VNNI, AVX2, ARM sdot: `native.available()`),
torch's ops otherwise.
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
from ..rotation.online import OnlineHadamard
from . import cpu, native

KERNELS = ("int4", "int8", "dequant", "triton_int4", "triton_int8", "cpu_w4a8", "cpu_w8a8")  # the built-in layouts
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


def holds_int4(spec: QuantSpec) -> bool:
    """Whether the int4 form (two codes a byte, per-channel or grouped scales) can hold weights of `spec`."""
    return spec.bits <= 4 and spec.granularity in ("channel", "group")


def holds_int8(spec: QuantSpec) -> bool:
    """Whether the int8 form (int8 codes, one scale per output channel, no zero point) can hold weights of `spec`."""
    return 4 < spec.bits <= 8 and spec.granularity == "channel" and spec.symmetric


def int4_offset(spec: QuantSpec) -> int:
    """off in the int4 form's unsigned codes u = code + off in [0, 15], centred on 8 (`_int4_form`)."""
    return 8 if spec.symmetric else 8 - 2 ** (spec.bits - 1)


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
    int4, int8 = holds_int4(w_spec), holds_int8(w_spec)
    if native.supports_act(act_spec) and (int4 or int8) and native.available():
        if int4 and (w_spec.granularity == "channel" or w_spec.group_size % 8 == 0):
            return "cpu_w4a8"
        if int8:  # also on AVX2: against torch capped at AVX2 (what an AVX2-only CPU runs), ours decodes the 1B
            return "cpu_w8a8"  # lm_head in 4.4 against 9.7 ms and is level at 4-15 tokens
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
    off = int4_offset(spec)
    return codes + off, (8 - zero - off) * scale


def _portable_qweight(u: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit codes [N, K] -> the saved layout uint8 [N, ceil(K/2)] (an odd K padded with code 8)."""
    return cpu.pack_nibbles_raw(F.pad(u, (0, u.shape[1] % 2), value=8).to(torch.uint8))


def _portable_tensors(ql: QuantLinear, kernel: str) -> dict[str, torch.Tensor]:
    """`PackedLinear.export_tensors()` of `ql` in the portable form `kernel` ("int4" / "int8" / "dequant"),
    computed directly from its codes (no CPU-only packing op)."""
    out = {} if ql.bias is None else {"bias": ql.bias.detach().to(torch.bfloat16)}
    if kernel == "dequant":
        out["weight"] = ql.qweight.dequantize(torch.float32).to(torch.bfloat16)
        return out
    codes, scale, zero = _codes_scale_zero(ql)
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


def native_hadamard(t: nn.Module | None, x: torch.Tensor) -> bool:
    """Whether transform t of x [..., n] is an orthonormal power-of-two Hadamard the C kernels run (CPU)."""
    n = x.shape[-1]
    return isinstance(t, OnlineHadamard) and t.blocks == [n] and n & (n - 1) == 0 and x.device.type == "cpu" \
        and native.plain_kernels()


def apply_transform(t: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An online transform of x [..., n] (a packed linear's R4, the lean decoder's R3 on queries / keys): an
    orthonormal power-of-two Hadamard on the CPU is one C call (`native.fwht`, float32 out: the module's butterflies
    in float32, bit-identical on float32 input, one rounding instead of one per stage on bf16; at decode time the
    module's ~40 small ops per layer were the cost), anything else the module itself."""
    return native.fwht(x) if native_hadamard(t, x) else t(x)


# ---- the registry of packed layouts --------------------------------------------------------------
LAYOUTS: dict[str, type["PackedLinear"]] = {}


def register_layout(cls: type["PackedLinear"]) -> type["PackedLinear"]:
    """Class decorator: make a PackedLinear subclass available under its `kernel` name (pack, save / load)."""
    if not cls.kernel or cls.portable not in ("int4", "int8", "dequant"):
        raise ValueError(f"{cls.__name__} needs a kernel name and a portable form (int4, int8 or dequant)")
    LAYOUTS[cls.kernel] = cls
    return cls


def layout(kernel: str) -> type["PackedLinear"]:
    """The PackedLinear class registered for `kernel`."""
    if kernel not in LAYOUTS:
        raise ValueError(f"unknown kernel {kernel!r}; available: {tuple(LAYOUTS)}")
    return LAYOUTS[kernel]


class PackedLinear(nn.Module):
    """y = W_q · a + b with a real low-bit kernel; x [..., in] -> y [..., out] (x's dtype).

    One subclass per packed layout (`spinquant/kernels/layouts/`), registered by kernel name. A subclass says how
    its buffers are built from and written to the portable form (`load_tensors` / `export_tensors`: what
    `spinquant.export` saves, shared by every layout of one weight form), how it multiplies (`matmul`) and what
    weight it multiplies by (`dequantized_weight`); the input transform (R4), bias and adapter are handled here.
    """

    kernel: str = ""     # the registry name
    portable: str = ""   # the saved form: "int4", "int8" or "dequant"
    fuses_hadamard: bool = False  # matmul(x, out_dtype, hadamard=True) multiplies x·H/sqrt(n) in the same kernel call

    def __init__(self, in_features: int, out_features: int, w_spec: QuantSpec, act_spec: QuantSpec | None,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.w_spec = w_spec
        self.act_spec = act_spec if act_spec is not None and act_spec.enabled else None
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16).clone())
        self.input_transform: nn.Module | None = None
        self.adapter: nn.Module | None = None
        self.group = self.k_pad = self.n_pad = None

    # ---- building ---------------------------------------------------------------------------------
    @classmethod
    def from_quant_linear(cls, ql: QuantLinear, kernel: str | None = None, backend: str = "cpu") -> "PackedLinear":
        """Pack a fake-quant linear onto `kernel` (default: this class's, or `choose_kernel`'s for PackedLinear)."""
        qw = ql.qweight
        if qw is None:
            raise ValueError(f"{ql} has no quantized weight to pack (16-bit linears stay nn.Linear)")
        kernel = kernel or cls.kernel or choose_kernel(qw.spec, ql.act_spec, backend)
        impl = layout(kernel)
        return impl.from_export(impl.tensors_of(ql), ql.in_features, ql.out_features, qw.spec, ql.act_spec, kernel,
                                ql.input_transform, ql.adapter)

    @classmethod
    def tensors_of(cls, ql: QuantLinear) -> dict[str, torch.Tensor]:
        """The portable form of `ql`'s weights for this layout, computed from its codes."""
        return _portable_tensors(ql, cls.portable)

    @classmethod
    def from_export(cls, t: dict[str, torch.Tensor], in_features: int, out_features: int, w_spec: QuantSpec,
                    act_spec: QuantSpec | None, kernel: str | None = None, input_transform=None,
                    adapter=None) -> "PackedLinear":
        """Inverse of `export_tensors` onto `kernel` (default this class's; shapes already checked by the caller)."""
        impl = layout(kernel or cls.kernel)
        m = impl(in_features, out_features, w_spec, act_spec, t.get("bias"))
        m.input_transform, m.adapter = input_transform, adapter
        m.load_tensors(t)
        return m

    # ---- what a layout provides -------------------------------------------------------------------
    def load_tensors(self, t: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def export_tensors(self) -> dict[str, torch.Tensor]:
        """Device- and layout-independent tensors (what `spinquant.export` writes), weights at their bit-width:
        int4: qweight uint8 [out, ceil(in/2)] (two codes a byte, low nibble first; u = code + 8 - offset),
        scale bf16 [out, groups] and, if asymmetric, zero bf16 [out, groups] with w = (u - 8)·scale + zero;
        int8: qweight int8 [out, in], scale float32 [out]; dequant: weight bf16 [out, in]."""
        raise NotImplementedError

    def dequantized_weight(self) -> torch.Tensor:
        """The weight this module multiplies by, float32 [out, in] (what the kernel computes with)."""
        raise NotImplementedError

    def matmul(self, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """x [M, in] (after the input transform) -> [M, out] in float32 or `out_dtype`, activations quantized as
        `act_spec` says. A layout with `fuses_hadamard` also takes `hadamard=True`: x is then the transform's input
        (an orthonormal power-of-two Hadamard, applied inside the kernel exactly as `native.fwht` does)."""
        raise NotImplementedError

    def int8_table(self) -> torch.Tensor | None:
        """The int8 weight table a tied embedding can share (int8 layouts), else None."""
        return None

    # ---- shared -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, self.in_features)
        direct = self.bias is None and self.adapter is None  # the kernel may then write x's dtype itself
        out = dtype if direct and dtype in (torch.bfloat16, torch.float32) else torch.float32
        # the R4 inside the kernel's activation quantization (one C call, no rotated copy of x), unless the adapter
        # needs the rotated input too
        if self.fuses_hadamard and self.adapter is None and native_hadamard(self.input_transform, x):
            y = self.matmul(x, out, hadamard=True)
        else:
            if self.input_transform is not None:
                x = apply_transform(self.input_transform, x)
            y = self.matmul(x, out)
        if self.bias is not None:
            y = y + self.bias.float()
        if self.adapter is not None:
            y = y + self.adapter(self.quantized_input(x)).float()
        return y.to(dtype).reshape(*shape[:-1], self.out_features)

    def codes(self, x: torch.Tensor):
        """(v, zero, scale) of x [M, in] under act_spec (token_codes), or (None, None, None) for 16-bit inputs.
        Computed per call: nothing is cached across calls (an input changed in place is always seen)."""
        return token_codes(x, self.act_spec) if self.act_spec is not None else (None, None, None)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the weights see: x [M, in] fake-quantized as act_spec says, float32."""
        v, z, s = self.codes(x)
        return x.float() if v is None else (v - z) * s

    def weight_buffers(self) -> list[torch.Tensor]:
        """The buffers a matmul reads as weights (codes, scales; not the derived row sums or bf16 scale copy)."""
        return [b for n, b in self.named_buffers(recurse=False)
                if b is not None and n not in ("bias", "colsum", "w_scale_bf16", "rsum")]

    @property
    def portable_kernel(self) -> str:
        """The kernel name the saved form records (Triton and native layouts save as their torch counterparts)."""
        return self.portable

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same function in float32 with a dense dequantized weight (no kernel)."""
        x = x.reshape(-1, self.in_features).float()
        if self.input_transform is not None:
            x = self.input_transform(x)
        x = self.quantized_input(x)
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
