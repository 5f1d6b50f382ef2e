"""compressed-tensors checkpoints (the format vLLM and transformers load), written from our codes.

Two layouts, chosen per linear from its spec (one config group per distinct spec, targets = exact module names, so
per-module overrides carry over):
- weight-only int4 (or 2-8 bit) symmetric, per-channel or grouped -> `pack-quantized`: `weight_packed` (int32, 32/b
  codes per word, code + 2^(b-1) at bit b·i, compressed_tensors.pack_to_int32's layout), `weight_scale` [out,
  groups], `weight_shape`.
- int8 symmetric per-channel weights with dynamic per-token int8 activations (W8A8) -> `int-quantized`: `weight`
  (int8 codes), `weight_scale` [out, 1], `input_activations` {dynamic, token}.
Refused before anything is written: asymmetric weights, activation specs other than dynamic per-token int8,
KV-cache quantization, online R3/R4 Hadamards, LoRA adapters, a quantized embedding / lm_head. Scales are stored in
float32 and the checkpoint's dtype is float32, so the reloaded weights are our dequantized weights exactly.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .export import check_fused_only
from .models.adapter import get_adapter
from .quant.linear import QuantEmbedding, QuantLinear
from .writes import check_dir, write_dir

WRITER = "compressed-tensors"


class CTExportError(ValueError):
    """The model holds something the compressed-tensors export cannot carry (said before anything is written)."""


def _ct():
    try:
        import compressed_tensors  # noqa: F401
        from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    except ImportError:
        raise ImportError("compressed-tensors export needs the compressed-tensors package: "
                          "pip install 'spinquant[compressed-tensors]'") from None
    return QuantizationArgs, QuantizationConfig, QuantizationScheme


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes [rows, cols] -> int32 [rows, ceil(cols·bits/32)]: code + 2^(bits-1) at bit bits·i of the row's
    bit stream, little end first (compressed-tensors' pack-quantized layout; bits dividing 32 only)."""
    if 32 % bits:
        raise CTExportError(f"{bits}-bit codes straddle int32 words; export 2, 4 or 8-bit weights")
    per = 32 // bits
    rows, cols = codes.shape
    u = (codes.to(torch.int64) + (1 << (bits - 1)))
    pad = (-cols) % per
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))
    u = u.reshape(rows, -1, per) << (torch.arange(per, dtype=torch.int64) * bits)
    word = u.sum(-1)  # < 2^32
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def _args(spec, QuantizationArgs):
    strategy = {"group": "group", "channel": "channel", "tensor": "tensor", "token": "token"}[spec.granularity]
    return QuantizationArgs(num_bits=spec.bits, type="int", symmetric=spec.symmetric, strategy=strategy,
                            group_size=spec.group_size if spec.granularity == "group" else None,
                            dynamic=bool(spec.dynamic))


def _layout(m, where: str):
    """('pack-quantized' | 'int-quantized' | None, weight spec, act spec) of one decoder linear, or an error."""
    qw = getattr(m, "qweight", None)
    act = getattr(m, "act_spec", None)
    if getattr(m, "input_transform", None) is not None:
        raise CTExportError(f"{where} has an online Hadamard (R4); compressed-tensors checkpoints here hold R1/R2 "
                            f"fused rotations only: use rotation=quarot_offline / spinquant_offline")
    if getattr(m, "adapter", None) is not None:
        raise CTExportError(f"{where} carries a LoRA adapter beside its quantized weight; merge it or export another model")
    if qw is None:
        if act is not None:
            raise CTExportError(f"{where}: quantized activations on an FP weight have no compressed-tensors layout here")
        return None, None, None
    s = qw.spec
    if not s.symmetric:
        raise CTExportError(f"{where}: asymmetric weights ({s.short()}) are not exported; use a symmetric preset "
                            f"(e.g. quant=w4a16 or w4a16_g128)")
    if act is None:
        if s.granularity not in ("group", "channel"):
            raise CTExportError(f"{where}: weight granularity {s.granularity!r} is not exported (group or channel)")
        return "pack-quantized", s, None
    if s.bits == 8 and s.granularity == "channel" and act.bits == 8 and act.granularity == "token" and act.dynamic:
        return "int-quantized", s, act
    raise CTExportError(f"{where}: {s.short()} weights with {act.short()} activations have no compressed-tensors layout "
                        f"here; export weight-only (quant=w4a16 / w4a16_g128) or W8A8 (quant=w8a8)")


def check_config(quant, rotation_cfg=None, qat_cfg=None) -> None:
    """The export's refusals from the run's configuration alone (per-module overrides merged in, as the model will
    be quantized), before any model is loaded or trained."""
    if quant.kv.enabled:
        raise CTExportError("KV-cache quantization is not exported: export a model without KV quantization")
    pairs = [("quant", quant.weight, quant.act)]
    pairs += [(f"quant.overrides[{o.modules!r}]", o.over(quant.weight, "weight"), o.over(quant.act, "act"))
              for o in quant.overrides if not o.skip]
    for where, w, act in pairs:
        if w.enabled and not w.symmetric:
            raise CTExportError(f"{where}: asymmetric weights ({w.short()}) are not exported; use a symmetric preset "
                                f"(quant=w4a16)")
        if act.enabled and not (w.enabled and w.bits == 8 and w.granularity == "channel" and act.bits == 8
                                and act.granularity == "token" and act.dynamic):
            raise CTExportError(f"{where}: {w.short() if w.enabled else 'FP'} weights with {act.short()} activations "
                                f"have no compressed-tensors layout here; export weight-only (quant=w4a16 / "
                                f"w4a16_g128) or W8A8 (quant=w8a8)")
    for what in ("embed", "lm_head"):
        if getattr(quant, what).enabled:
            raise CTExportError(f"quant.{what} is quantized; this export keeps it in full precision")
    check_fused_only(rotation_cfg, qat_cfg, "this compressed-tensors export", CTExportError)


def check_exportable(model) -> dict:
    """{module name: (format, weight spec, act spec)} of every quantized decoder linear; raises what cannot go."""
    a = get_adapter(model)
    names = {id(m): n for n, m in model.named_modules()}
    plan = {}
    for i, layer in enumerate(a.decoder_layers(model)):
        attn = a.attention(layer)
        if getattr(attn, "qk_transform", None) is not None:
            raise CTExportError(f"layer {i} has an online Hadamard on Q/K (R3); use rotation=quarot_offline / "
                                f"spinquant_offline (R1/R2 only)")
        if getattr(attn, "kv_quantizer", None) is not None:
            raise CTExportError("KV-cache quantization is not exported (vLLM's kv_cache_scheme calibrates its own "
                                "scales): export a model without KV quantization")
        for role, m in a.layer_linears(layer).items():
            if not isinstance(m, (QuantLinear, torch.nn.Linear)):
                raise CTExportError(f"layer {i} {role}_proj is a {type(m).__name__}; export before packing")
            fmt, w, act = _layout(m, f"layer {i} {role}_proj")
            if fmt:
                plan[names[id(m)]] = (fmt, w, act)
    for what, m in (("embedding", a.embedding(model)), ("lm_head", a.head(model))):
        if isinstance(m, (QuantLinear, QuantEmbedding)) and getattr(m, "qweight", None) is not None:
            raise CTExportError(f"the {what} is quantized; compressed-tensors checkpoints here keep it in full "
                                f"precision (quant.{'embed' if what == 'embedding' else 'lm_head'}.bits=16)")
    if not plan:
        raise CTExportError("nothing is quantized: save the FP model with save_pretrained instead")
    if len({fmt for fmt, _, _ in plan.values()}) > 1:
        raise CTExportError("mixing weight-only and W8A8 linears in one checkpoint is not exported")
    return plan


def export_compressed_tensors(model, out, tokenizer=None, overwrite: bool = False) -> Path:
    """Write `model` (after `quantize_`) as a compressed-tensors checkpoint folder `out` (config.json with its
    quantization_config, model.safetensors, tokenizer). Checks first; the files appear complete or not at all, and a
    folder holding other files is refused unless `overwrite` (which keeps them; see `spinquant.writes`)."""
    from safetensors.torch import save_file
    QuantizationArgs, QuantizationConfig, QuantizationScheme = _ct()
    out = check_dir(out, WRITER, overwrite)
    plan = check_exportable(model)
    groups: dict[tuple, list[str]] = {}
    for name, (fmt, w, act) in plan.items():
        groups.setdefault((fmt, w, act), []).append(name)
    fmt = next(iter(groups))[0]
    config_groups = {f"group_{i}": QuantizationScheme(targets=names, weights=_args(w, QuantizationArgs),
                                                      input_activations=_args(act, QuantizationArgs) if act else None)
                     for i, ((_, w, act), names) in enumerate(groups.items())}
    qconfig = QuantizationConfig(config_groups=config_groups, format=fmt, quantization_status="compressed",
                                 ignore=[get_adapter(model).lm_head])
    tensors, covered = {}, set()
    for name, (f, w, _) in plan.items():
        qw = model.get_submodule(name).qweight
        scale = qw.scale.reshape(qw.codes.shape[0], -1).float().contiguous()
        if f == "pack-quantized":
            tensors[f"{name}.weight_packed"] = pack_int32(qw.codes, w.bits).contiguous()
            tensors[f"{name}.weight_shape"] = torch.tensor(list(qw.codes.shape), dtype=torch.int64)
        else:
            tensors[f"{name}.weight"] = qw.codes.to(torch.int8).contiguous()
        tensors[f"{name}.weight_scale"] = scale
        covered.add(f"{name}.weight")
        bias = model.get_submodule(name).bias
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach().float().contiguous()
            covered.add(f"{name}.bias")
    seen = set()
    for k, v in model.state_dict().items():
        if k in covered or k in tensors or v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        tensors[k] = v.detach().float().contiguous()
    cfg = model.config.to_dict()
    cfg.update(quantization_config=qconfig.model_dump(exclude_none=True), dtype="float32", torch_dtype="float32")
    with write_dir(out, WRITER, overwrite) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out
