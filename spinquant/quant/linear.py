"""Fake-quant modules: what accuracy is measured on (packed kernels must reproduce these numbers)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .quantizer import fake_quantize
from .registry import QuantizedWeight
from .spec import QuantSpec


class QuantLinear(nn.Module):
    """y = dequant(W_q) · fq_act(t(x)) + b, for x [..., in] -> y [..., out].

    `weight` holds the dequantized weights (float) so the forward is a plain matmul; `qweight` keeps the
    integer codes and scales for size accounting and packing. `input_transform` is an optional online
    transform of the input (e.g. the R4 Hadamard before down_proj), applied before activation quantization.
    `adapter` is an optional 16-bit side path on the same input (a LoRA kept beside the quantized base).
    """

    def __init__(self, qweight: QuantizedWeight | None, weight: torch.Tensor, bias: torch.Tensor | None,
                 act_spec: QuantSpec | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.qweight = qweight
        self.act_spec = act_spec if act_spec is not None and act_spec.enabled else None
        if self.act_spec is not None:
            self.act_spec.check_shape(self.in_features, "activation")
        self.input_transform: nn.Module | None = None
        self.adapter: nn.Module | None = None

    @property
    def weight_spec(self) -> QuantSpec:
        return self.qweight.spec if self.qweight is not None else QuantSpec()

    @classmethod
    def from_linear(cls, linear: nn.Linear, qweight: QuantizedWeight | None, act_spec: QuantSpec | None = None):
        w = linear.weight.data if qweight is None else qweight.dequantize(linear.weight.dtype)
        b = None if linear.bias is None else linear.bias.data.clone()
        q = cls(qweight, w.to(linear.weight.device), b, act_spec)
        q.input_transform = getattr(linear, "input_transform", None)  # keep an online rotation (R4)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform is not None:
            x = self.input_transform(x)
        x = fake_quantize(x, self.act_spec)
        y = F.linear(x, self.weight, self.bias)
        return y if self.adapter is None else y + self.adapter(x)

    def extra_repr(self) -> str:
        a = self.act_spec.short() if self.act_spec else "fp16"
        return f"in={self.in_features}, out={self.out_features}, w={self.weight_spec.short()}, a={a}"


class QuantEmbedding(nn.Embedding):
    """Embedding whose table is stored quantized (per-row scales); lookup returns dequantized rows."""

    def __init__(self, qweight: QuantizedWeight, padding_idx=None):
        w = qweight.dequantize()
        super().__init__(w.shape[0], w.shape[1], padding_idx=padding_idx, _weight=w, _freeze=True)
        self.qweight = qweight


class KVQuantizer(nn.Module):
    """Fake-quantizes keys and values [b, kv_heads, seq, head_dim] per head and token (groups along head_dim)."""

    def __init__(self, k_spec: QuantSpec, v_spec: QuantSpec):
        super().__init__()
        self.k_spec, self.v_spec = k_spec, v_spec

    def forward(self, k: torch.Tensor, v: torch.Tensor):
        return fake_quantize(k, self.k_spec), fake_quantize(v, self.v_spec)

    def extra_repr(self) -> str:
        return f"k={self.k_spec.short()}, v={self.v_spec.short()}"
