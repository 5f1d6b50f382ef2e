"""`prepare` a model for QAT (fake-quant linears, optional LoRA) and `convert` it back to the
quantized model that `spinquant` evaluates. The quantizer math is `spinquant.quant`'s, not a copy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.adapter import get_adapter
from ..models.attention import use_spinquant_attention
from ..models.state import state_of
from ..quant.apply import check_shapes, linear_specs, quantize_embeddings, set_module
from ..quant.linear import KVQuantizer, QuantLinear
from ..quant.quantizer import compute_qparams, fake_quant_grouped, fake_quantize, group_view, quantize
from ..quant.registry import QuantizedWeight
from ..quant.schemes import QuantConfig
from ..quant.spec import QuantSpec
from .lora import LoRA

ROLES = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass
class QATConfig:
    """What trains. mode: full (all linear weights, through fake quant) | lora (frozen fake-quant base +
    adapters). scales: fixed (RTN init, MSE clip if the spec says so) | learnable (LSQ). qa_lora: pool
    the adapters' inputs over each weight group so that `convert(merge=True)` keeps the integer grid."""

    mode: str = "lora"
    scales: str = "fixed"
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = field(default=ROLES)
    qa_lora: bool = False

    def __post_init__(self):
        if self.mode not in ("full", "lora"):
            raise ValueError(f"qat mode must be 'full' or 'lora', got {self.mode!r}")
        if self.scales not in ("fixed", "learnable"):
            raise ValueError(f"qat scales must be 'fixed' or 'learnable', got {self.scales!r}")
        bad = [t for t in self.lora_targets if t not in ROLES]
        if bad:
            raise ValueError(f"LoRA target module(s) {bad} do not exist; decoder linears are {list(ROLES)}")
        self.lora_targets = tuple(self.lora_targets)


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g):
        ctx.g = g
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.g, None


def _grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """Value exactly x, gradient scaled by g (LSQ's step-size gradient scale; (x − x·g).detach() + x·g would
    change the value by an ulp, and the converted model would differ from the trained one)."""
    return _GradScale.apply(x, g)


class FakeQuantLinear(nn.Module):
    """y = fq_w(W)·a + b [+ LoRA(a)], a = fq_act(t(x)): x [..., in] -> y [..., out].

    Weights are fake-quantized with a clipped straight-through estimator; their scales are fixed at the
    RTN values or learned (LSQ, gradient scaled by 1/sqrt(numel·qmax)); zero-points stay at their init.
    """

    def __init__(self, linear: nn.Linear, w_spec: QuantSpec, act_spec: QuantSpec | None, learn_scales: bool,
                 train_weight: bool):
        super().__init__()
        self.out_features, self.in_features = linear.weight.shape
        self.w_spec = w_spec
        self.act_spec = act_spec if act_spec is not None and act_spec.enabled else None
        self.weight = nn.Parameter(linear.weight.detach().clone().float(), requires_grad=train_weight)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        scale, zero = compute_qparams(self.weight.detach(), w_spec)
        self.scale = nn.Parameter(scale, requires_grad=learn_scales)
        self.register_buffer("zero", zero)
        self.input_transform = getattr(linear, "input_transform", None)
        self.lora: LoRA | None = None

    def fake_weight(self) -> torch.Tensor:
        """fq(W) [out, in]."""
        s = self.scale
        if s.requires_grad:
            s = _grad_scale(s, 1.0 / math.sqrt(self.weight.numel() * self.w_spec.qmax))
        wg = group_view(self.weight, self.w_spec)
        return fake_quant_grouped(wg, s, self.zero, self.w_spec.qmin, self.w_spec.qmax).reshape(self.weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform is not None:
            x = self.input_transform(x)
        x = fake_quantize(x, self.act_spec)
        w = self.fake_weight() if self.w_spec.enabled else self.weight
        y = F.linear(x, w.to(x.dtype), self.bias)
        return y if self.lora is None else y + self.lora(x)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, w={self.w_spec.short()}, "
                f"a={self.act_spec.short() if self.act_spec else 'fp16'}, learn_scales={self.scale.requires_grad}")


def prepare(model: nn.Module, quant: QuantConfig, cfg: QATConfig | None = None) -> nn.Module:
    """Swap every decoder linear for a `FakeQuantLinear` (in place) and freeze what does not train.

    Embedding / lm_head / KV cache follow `quant` as in PTQ (frozen). Returns the model; its trainable
    parameters are the linear weights (mode=full) or the LoRA adapters (mode=lora), plus scales if learnable.
    """
    cfg = cfg or QATConfig()
    a = get_adapter(model)
    check_shapes(model, a, quant)
    use_spinquant_attention(model)
    for p in model.parameters():
        p.requires_grad_(False)
    specs = linear_specs(model, quant)  # per module, after quant.overrides
    for i, layer in enumerate(a.decoder_layers(model)):
        for role, path in a.linear_names().items():
            lin = layer.get_submodule(path)
            w_spec, act_spec = specs[i][role]
            fq = FakeQuantLinear(lin, w_spec, act_spec, cfg.scales == "learnable" and w_spec.enabled,
                                 train_weight=cfg.mode == "full")
            if cfg.mode == "lora" and role in cfg.lora_targets:
                pool = None
                if cfg.qa_lora:
                    pool = w_spec.group_size if w_spec.granularity == "group" else lin.in_features
                fq.lora = LoRA(lin.in_features, lin.out_features, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
                               pool, name=f"layer {i} {role}_proj").to(lin.weight.device)
            set_module(layer, path, fq.to(lin.weight.device))
        a.attention(layer).kv_quantizer = KVQuantizer(quant.kv, quant.kv) if quant.kv.enabled else None
    quantize_embeddings(model, a, quant)
    state_of(model).quant = quant
    return model


def convert(model: nn.Module, merge: bool = False) -> nn.Module:
    """FakeQuantLinear -> QuantLinear with integer codes from the trained weights and scales (in place).

    LoRA adapters are kept beside the quantized base in 16 bit (merge=False), or merged (merge=True,
    QA-LoRA adapters only): the update is constant per (row, group), so it moves each group's zero-point
    by -c/scale and the codes stay on the grid.
    """
    a = get_adapter(model)
    for layer in a.decoder_layers(model):
        for role, path in a.linear_names().items():
            fq = layer.get_submodule(path)
            if not isinstance(fq, FakeQuantLinear):
                continue
            spec = fq.w_spec
            W = fq.weight.detach().float()
            if spec.enabled:
                scale, zero = fq.scale.detach().clone(), fq.zero.clone()
                qw = QuantizedWeight(quantize(W, scale, zero, spec), scale, zero, spec)
            else:
                qw = None
            adapter = fq.lora
            if adapter is not None and merge:
                if not adapter.pool_group or qw is None:
                    raise ValueError(f"{role}_proj: only QA-LoRA adapters (qat.qa_lora=true) on quantized weights can "
                                     "be merged onto the grid; use merge=false to keep them beside the base")
                c = adapter.delta_weight().detach().float()[:, ::adapter.pool_group]  # [out, n_groups]
                qw.zero = zero - c.reshape(scale.shape) / scale
                adapter = None
            lin = nn.Linear(fq.in_features, fq.out_features, bias=fq.bias is not None, device=W.device)
            lin.weight.data = W
            if fq.bias is not None:
                lin.bias.data = fq.bias.detach().clone()
            ql = QuantLinear.from_linear(lin, qw, fq.act_spec)
            ql.input_transform = fq.input_transform
            ql.adapter = adapter
            if adapter is not None:
                adapter.requires_grad_(False)
            set_module(layer, path, ql)
    return model
