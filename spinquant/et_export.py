"""ExecuTorch programs (.pte on the XNNPACK backend) for Meta's on-device recipe, written from our codes.

Every quantized linear becomes `torchao`'s dynamic-int8-activation pattern on *our* integer weights:
choose_qparams_affine / quantize_affine / dequantize_affine (asym int8 per token) on the input, dequantize_affine of
our codes with our scales (per group or per channel) as the weight, then linear. XNNPACK's partitioner lowers that to
its qd8-f32-qb4w (int4 groups, bf16 scales) / qc8w (int8 per channel) GEMMs. The embedding becomes
`quantized_decomposed.embedding_byte` (int8 per row). An online R4 Hadamard (down_proj input) runs as ExecuTorch's
own `llama::fast_hadamard_transform` when our transform is that op (a power-of-two Sylvester Hadamard, checked
numerically), else as a dense fp32 matmul by our matrix (exact, slower). The KV cache is transformers' static cache
(`TorchExportableModuleForDecoderOnlyLM`); the program takes (input_ids [1, L], cache_position [L]) for any
1 <= L <= max_seq_len and returns logits [1, L, vocab].

Bit-exactness: the weights XNNPACK holds equal ours when grouped scales are bf16-representable (quant=executorch_w4a8
rounds them so); per-channel scales stay fp32. Activation codes are computed at run time by XNNPACK (asymmetric int8
per token, as our spec), so logits match our model to rounding of those codes, not bit for bit.
Refused before anything is written: R3 (online Hadamard on Q/K), KV-cache quantization, LoRA adapters, asymmetric or
non-4/8-bit weights, activation specs other than int8 asym dynamic per-token, a packed model.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .export import check_fused_only
from .models.adapter import get_adapter
from .quant.linear import QuantEmbedding, QuantLinear
from .writes import check_file, write_file

WRITER = "ExecuTorch"


class ETExportError(ValueError):
    """The model holds something this ExecuTorch export cannot carry (said before anything is written)."""


def _torchao():
    try:
        from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, dequantize_affine, quantize_affine
    except ImportError:
        raise ImportError("the ExecuTorch export needs executorch and torchao: pip install 'spinquant[executorch]'") from None
    return MappingType, choose_qparams_affine, quantize_affine, dequantize_affine


def executorch_api():
    try:
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (llama::fast_hadamard_transform)
        import executorch.kernels.quantized  # noqa: F401  (quantized_decomposed::embedding_byte)
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower
    except ImportError:
        raise ImportError("the ExecuTorch export needs executorch: pip install 'spinquant[executorch]'") from None
    return XnnpackPartitioner, EdgeCompileConfig, to_edge_transform_and_lower


# ---- refusals -----------------------------------------------------------------------------------------------------

def _weight_ok(s) -> bool:
    return s.symmetric and s.bits in (4, 8) and s.granularity in ("group", "channel")


def _act_ok(a) -> bool:
    return a is None or not a.enabled or (a.bits == 8 and not a.symmetric and a.granularity == "token" and a.dynamic
                                          and a.clip_ratio == 1.0)


def _scale_note(s) -> str:
    return (" (grouped scales must be bf16: XNNPACK stores them so; quant=executorch_w4a8 rounds them)"
            if s.granularity == "group" and s.scale_dtype != "bfloat16" else "")


def check_config(quant, rotation_cfg=None, qat_cfg=None) -> None:
    """The export's refusals from the run's configuration alone, before any model is loaded or trained."""
    w, act = quant.weight, quant.act
    if quant.kv.enabled:
        raise ETExportError("KV-cache quantization is not exported (the program's cache is transformers' fp32 static "
                            "cache): export a model without KV quantization (e.g. quant=executorch_w4a8)")
    weights = [("weight", w), ("lm_head", quant.lm_head)]
    weights += [(f"overrides[{o.modules!r}].weight", o.over(w, "weight")) for o in quant.overrides if o.weight]
    for what, spec in weights:
        if spec.enabled and not (_weight_ok(spec) and _scale_note(spec) == ""):
            raise ETExportError(f"quant.{what} {spec.short()}{_scale_note(spec)} is not an XNNPACK weight layout here; "
                                f"use quant=executorch_w4a8 (int4 sym g32 bf16 scales; int8 sym per-channel)")
    acts = [("act", act), ("lm_head_act", quant.lm_head_act)]
    acts += [(f"overrides[{o.modules!r}].act", o.over(act, "act")) for o in quant.overrides if o.act]
    for what, spec in acts:
        if spec is not None and spec.enabled and not _act_ok(spec):
            raise ETExportError(f"quant.{what} {spec.short()} is not XNNPACK's dynamic activation quantization (int8 "
                                f"asym per token, no clipping); use quant=executorch_w4a8")
    e = quant.embed
    if e.enabled and not (e.bits == 8 and e.symmetric and e.granularity == "channel"):
        raise ETExportError(f"quant.embed {e.short()} is not exported; ExecuTorch's embedding_byte takes int8 per-row "
                            f"codes (quant.embed: int8 sym per-channel, as quant=executorch_w4a8)")
    rot = rotation_cfg
    if rot is not None and getattr(rot, "r3", False):
        raise ETExportError("an online Hadamard on Q/K (R3) is not exported (ExecuTorch runs SpinQuant's R4, not R3): "
                            "use rotation=spinquant/quarot with rotation.r3=false, or the *_offline presets")
    check_fused_only(None, qat_cfg, "the ExecuTorch export", ETExportError)  # unmerged LoRA; R4 is carried
    if qat_cfg is not None and qat_cfg.name != "none" and qat_cfg.scales == "learnable" and w.granularity == "group":
        raise ETExportError("qat.scales=learnable trains fp32 group scales that XNNPACK would round to bf16; use "
                            "qat.scales=fixed")


def check_exportable(model) -> None:
    """Raise ETExportError for anything in `model` (after quantize_) the program cannot carry."""
    a = get_adapter(model)
    for i, layer in enumerate(a.decoder_layers(model)):
        attn = a.attention(layer)
        if getattr(attn, "qk_transform", None) is not None:
            raise ETExportError(f"layer {i} has an online Hadamard on Q/K (R3); ExecuTorch runs R4 only: rotate with "
                                f"rotation.r3=false")
        if getattr(attn, "kv_quantizer", None) is not None:
            raise ETExportError("KV-cache quantization is not exported: export a model without KV quantization")
        for role, m in a.layer_linears(layer).items():
            _check_linear(m, f"layer {i} {role}_proj")
    _check_linear(a.head(model), "lm_head")
    emb = a.embedding(model)
    if isinstance(emb, QuantEmbedding):
        s = emb.qweight.spec
        if not (s.bits == 8 and s.symmetric and s.granularity == "channel"):
            raise ETExportError(f"the embedding is {s.short()}; embedding_byte takes int8 sym per-row codes")


def _check_linear(m, where: str) -> None:
    if isinstance(m, nn.Linear):
        return
    if not isinstance(m, QuantLinear):
        raise ETExportError(f"{where} is a {type(m).__name__}; export the fake-quant model, before packing")
    if m.adapter is not None:
        raise ETExportError(f"{where} carries a LoRA adapter beside its quantized weight; merge it first")
    if m.qweight is not None and not (_weight_ok(m.qweight.spec) and _scale_note(m.qweight.spec) == ""):
        s = m.qweight.spec
        raise ETExportError(f"{where}: {s.short()} weights{_scale_note(s)} are not an XNNPACK layout here; use "
                            f"quant=executorch_w4a8")
    if not _act_ok(m.act_spec):
        raise ETExportError(f"{where}: {m.act_spec.short()} activations are not XNNPACK's dynamic int8 per-token")


# ---- the exportable modules ---------------------------------------------------------------------------------------

class ExecuTorchHadamard(nn.Module):
    """x [..., n] -> x M for our online Hadamard M: ExecuTorch's fast_hadamard_transform when it computes M (checked
    on the identity), else a dense matmul by M."""

    def __init__(self, transform: nn.Module):
        super().__init__()
        M = transform.matrix(torch.float32) if hasattr(transform, "matrix") else transform(torch.eye(transform.n))
        n = M.shape[0]
        self.fast = False
        if n & (n - 1) == 0:
            executorch_api()
            probe = torch.ops.llama.fast_hadamard_transform(torch.eye(n))
            self.fast = bool(torch.allclose(probe, M, atol=1e-6))
        self.register_buffer("matrix", None if self.fast else M.contiguous())

    def forward(self, x):
        return torch.ops.llama.fast_hadamard_transform(x) if self.fast else x @ self.matrix


class ExecuTorchLinear(nn.Module):
    """Our integer weights (codes int8 [out, in]; scales [out] per channel or [out, in/group]) behind torchao's
    dynamic int8 per-token activation quant-dequant (when `act`), dequantized and multiplied: what XNNPACK lowers."""

    def __init__(self, m: QuantLinear):
        super().__init__()
        qw = m.qweight
        out_f, in_f = qw.codes.shape
        self.per_channel = qw.spec.granularity == "channel"
        self.block = in_f if self.per_channel else qw.spec.group_size
        self.qmin, self.qmax = qw.spec.qmin, qw.spec.qmax
        self.register_buffer("codes", qw.codes.to(torch.int8).contiguous())
        shape = (out_f,) if self.per_channel else (out_f, in_f // self.block)
        self.register_buffer("scale", qw.scale.reshape(shape).float().contiguous())
        self.register_buffer("zero", torch.zeros(shape, dtype=torch.int64 if self.per_channel else torch.int8))
        self.bias = None if m.bias is None else nn.Parameter(m.bias.detach().float().clone(), requires_grad=False)
        self.act = m.act_spec is not None
        self.hadamard = None if m.input_transform is None else ExecuTorchHadamard(m.input_transform)

    def forward(self, x):
        MappingType, choose_qparams_affine, quantize_affine, dequantize_affine = _torchao()
        if self.hadamard is not None:
            x = self.hadamard(x)
        if self.act:
            block = (1,) * (x.dim() - 1) + (x.shape[-1],)
            s, z = choose_qparams_affine(x, MappingType.ASYMMETRIC, block, torch.int8, -128, 127,
                                         zero_point_dtype=torch.int8)
            x = dequantize_affine(quantize_affine(x, block, s, z, torch.int8, -128, 127), block, s, z, torch.int8,
                                  -128, 127, output_dtype=x.dtype)
        if self.per_channel:  # XNNPACK's qc8w / qc4w (its affine path takes int4 only in blocks of 32)
            w = torch.ops.quantized_decomposed.dequantize_per_channel(self.codes, self.scale, self.zero, 0,
                                                                      self.qmin, self.qmax, torch.int8)
        else:  # qb4w: int4 in groups, bf16 scales
            w = dequantize_affine(self.codes, (1, self.block), self.scale, self.zero, torch.int8, self.qmin, self.qmax,
                                  output_dtype=torch.float32)
        return F.linear(x, w, self.bias)


class ExecuTorchEmbedding(nn.Module):
    """int8 rows [vocab, dim] with one scale per row: ExecuTorch's embedding_byte."""

    def __init__(self, m: QuantEmbedding):
        super().__init__()
        qw = m.qweight
        self.register_buffer("codes", qw.codes.to(torch.int8).contiguous())
        self.register_buffer("scale", qw.scale.reshape(-1).float().contiguous())

    def forward(self, ids):
        return torch.ops.quantized_decomposed.embedding_byte.default(self.codes, self.scale, None, -128, 127, ids)


def to_executorch_modules(model) -> nn.Module:
    """Replace, in place, every quantized linear / embedding of `model` by its exportable module; returns model."""
    executorch_api()
    check_exportable(model)
    a = get_adapter(model)
    tied = a.tied_embeddings(model)
    for name, m in list(model.named_modules()):
        new = None
        if isinstance(m, QuantLinear) and m.qweight is not None:
            new = ExecuTorchLinear(m)
        elif isinstance(m, QuantLinear):  # FP weight with an online transform (R4 only)
            new = nn.Sequential(ExecuTorchHadamard(m.input_transform), _plain(m)) if m.input_transform is not None \
                else _plain(m)
        elif isinstance(m, QuantEmbedding):
            new = ExecuTorchEmbedding(m)
        if new is not None:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
    if tied or getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False  # the head now holds its own weights; nothing may re-tie them
    return model


def _plain(m: QuantLinear) -> nn.Linear:
    lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
    lin.weight = nn.Parameter(m.weight.detach().float().clone(), requires_grad=False)
    if m.bias is not None:
        lin.bias = nn.Parameter(m.bias.detach().float().clone(), requires_grad=False)
    return lin


# ---- export -------------------------------------------------------------------------------------------------------

def export_executorch(model, path, max_seq_len: int, overwrite: bool = False) -> Path:
    """Write `model` (after quantize_, fake-quant) as an ExecuTorch program `path` (.pte, XNNPACK) with a static KV
    cache of `max_seq_len` positions. Checks first; the file appears complete or not at all. `model` is consumed
    (its quantized modules are replaced by exportable ones, in float32)."""
    XnnpackPartitioner, EdgeCompileConfig, to_edge_transform_and_lower = executorch_api()
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM
    path = check_file(path, WRITER, is_pte, overwrite, "ExecuTorch program")
    check_exportable(model)
    if max_seq_len > getattr(model.config, "max_position_embeddings", max_seq_len):
        raise ETExportError(f"max_seq_len {max_seq_len} exceeds the model's context "
                            f"{model.config.max_position_embeddings}")
    model = to_executorch_modules(model.float().eval().requires_grad_(False))
    model.generation_config.use_cache = True
    model.generation_config.cache_implementation = "static"
    wrapped = TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=max_seq_len)
    seq = torch.export.Dim("seq", min=1, max=max_seq_len)
    ids = torch.zeros(1, 2, dtype=torch.long)
    with torch.no_grad():
        ep = wrapped.export(input_ids=ids, cache_position=torch.arange(2),
                            dynamic_shapes={"input_ids": {1: seq}, "cache_position": {0: seq}}, strict=True)
    prog = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()],
                                           compile_config=EdgeCompileConfig(_check_ir_validity=False)).to_executorch()
    with write_file(path, WRITER, is_pte, overwrite, "ExecuTorch program") as tmp, open(tmp, "wb") as f:
        prog.write_to_file(f)
    return path


def is_pte(path) -> bool:
    """Whether `path` is an ExecuTorch program (flatbuffer file identifier "ET" + version at bytes 4-8)."""
    with open(path, "rb") as f:
        head = f.read(8)
    return len(head) == 8 and head[4:6] == b"ET"
