"""GGUF export for llama.cpp: our codes and scales written into its block formats, bit for bit (no re-quantization).

A weight quantized symmetrically in blocks of 32 along the input dimension with one fp16 scale per block (the
GGUF-Q4_0 / GGUF-Q8_0 presets, or any spec with the same grid: RTN, GPTQ, fixed-scale QAT) is exactly a Q4_0 /
Q8_0 tensor: llama.cpp dequantizes a Q4_0 block as (nibble - 8)·d and a Q8_0 block as q·d, our codes are
c ∈ [-8, 7] / [-128, 127] with x = c·s. Anything else is refused before a byte is written, naming the nearest
exportable preset. Layout facts (llama.cpp's convert_hf_to_gguf.py / ggml-quants.c):
- Q4_0 block (18 bytes): fp16 d, then 16 bytes whose low nibbles are elements 0..15 and high nibbles 16..31.
- Q8_0 block (34 bytes): fp16 d, then 32 int8.
- llama / mistral use llama.cpp's "normal" RoPE, which pairs adjacent dimensions where Hugging Face pairs the two
  halves of each head: the rows of q_proj (n_head heads) and k_proj (n_kv_head heads) are permuted. Qwen2 uses
  NeoX RoPE, the Hugging Face layout, and is written as is.
Online Hadamards (R3 on Q/K, R4 on down_proj), activation / KV quantization and unmerged LoRA adapters have no
GGUF equivalent and are refused; R1 / R2 are fused into the weights and export as they are.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .export import check_fused_only
from .models.adapter import get_adapter
from .quant.linear import QuantEmbedding, QuantLinear
from .writes import check_file, write_file

WRITER = "GGUF"

ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # HF model_type -> llama.cpp architecture
PERMUTE_QK = {"llama", "mistral"}
BLOCK = 32


class GGUFExportError(ValueError):
    """The model holds something a GGUF file cannot carry (said before anything is written)."""


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("GGUF export needs the gguf package: pip install 'spinquant[gguf]' (or pip install gguf)") from None
    return gguf


def block_format(qweight) -> str | None:
    """'Q4_0' / 'Q8_0' when the quantized weight's grid is exactly that block format, else None."""
    s = qweight.spec
    if not (s.symmetric and s.granularity == "group" and s.group_size == BLOCK and s.bits in (4, 8)):
        return None
    scale = qweight.scale.float()
    if not torch.equal(scale.to(torch.float16).float(), scale) or not torch.isfinite(scale).all():
        return None
    return "Q4_0" if s.bits == 4 else "Q8_0"


def encode_blocks(codes: torch.Tensor, scale: torch.Tensor, fmt: str) -> np.ndarray:
    """codes [rows, cols] (int, [-8, 7] or [-128, 127]) and scale [rows, cols/32(, 1)] -> uint8 [rows, bytes/row]."""
    rows, cols = codes.shape
    c = codes.to(torch.int16).reshape(rows, cols // BLOCK, BLOCK)
    d = scale.reshape(rows, cols // BLOCK).to(torch.float16).numpy().view(np.uint8).reshape(rows, cols // BLOCK, 2)
    if fmt == "Q4_0":
        u = (c + 8).to(torch.uint8)
        qs = (u[..., :16] | (u[..., 16:] << 4)).numpy()
    else:
        qs = c.to(torch.int8).numpy().view(np.uint8)
    return np.concatenate([d, qs], axis=-1).reshape(rows, -1)


def permute_rows(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face's rotate-half head layout -> llama.cpp's interleaved one (rows of q / k weights or scales)."""
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def spec_format(spec) -> str | None:
    """'Q4_0' / 'Q8_0' when a weight QuantSpec produces that block format exactly (fp16 scales included)."""
    if spec.symmetric and spec.granularity == "group" and spec.group_size == BLOCK and spec.bits in (4, 8) \
            and spec.scale_dtype == "float16":
        return "Q4_0" if spec.bits == 4 else "Q8_0"
    return None


def check_config(quant, rotation_cfg=None, qat_cfg=None) -> None:
    """The export's refusals from the run's configuration alone, before any model is loaded or trained."""
    def nearest(spec, what):
        q = "gguf_q8_0" if spec.bits > 4 else "gguf_q4_0"
        return GGUFExportError(f"{what}: {spec.short()}{' (fp32 scales)' if spec.scale_dtype is None else ''} is not a "
                               f"GGUF block format; the nearest exportable preset is quant={q} (symmetric int"
                               f"{8 if spec.bits > 4 else 4}, blocks of 32, fp16 scales: llama.cpp's "
                               f"{'Q8_0' if spec.bits > 4 else 'Q4_0'})")
    specs = [("quant.weight", quant.weight), ("quant.embed", quant.embed), ("quant.lm_head", quant.lm_head)]
    specs += [(f"quant.overrides[{o.modules!r}].weight", o.over(quant.weight, "weight"))
              for o in quant.overrides if o.weight]
    for what, spec in specs:
        if spec.enabled and spec_format(spec) is None:
            raise nearest(spec, what)
    if quant.act.enabled or quant.lm_head_act.enabled or any(o.act for o in quant.overrides):
        raise GGUFExportError("activation quantization has no GGUF equivalent (llama.cpp rounds activations its own "
                              "way): export a weight-only model (quant=gguf_q4_0 or gguf_q8_0)")
    if quant.kv.enabled:
        raise GGUFExportError("KV-cache quantization is llama.cpp's own runtime setting (--cache-type-k/v); export a "
                              "weight-only model (quant=gguf_q4_0 or gguf_q8_0)")
    check_fused_only(rotation_cfg, qat_cfg, "llama.cpp (GGUF)", GGUFExportError)
    if qat_cfg is not None and qat_cfg.name != "none" and qat_cfg.scales == "learnable":
        raise GGUFExportError("qat.scales=learnable trains fp32 scales that Q4_0 / Q8_0 cannot store; use "
                              "qat.scales=fixed")


def _weight(module, name: str, fp: str = "F16"):
    """(kind, payload) of a linear / embedding: ('Q4_0'|'Q8_0', (codes, scale)) or (`fp`, dense tensor)."""
    qw = getattr(module, "qweight", None)
    if qw is None:
        return fp, module.weight.detach().float()
    fmt = block_format(qw)
    if fmt is None:
        spec = qw.spec
        raise GGUFExportError(
            f"{name}: weights quantized as {spec.short()} (scales {spec.scale_dtype or 'float32'}) are not a GGUF "
            f"block format; the nearest exportable preset is quant={'gguf_q8_0' if spec.bits > 4 else 'gguf_q4_0'} "
            f"(symmetric int{8 if spec.bits > 4 else 4}, blocks of 32, fp16 scales: llama.cpp's "
            f"{'Q8_0' if spec.bits > 4 else 'Q4_0'})")
    return fmt, (qw.codes, qw.scale)


def check_exportable(model) -> None:
    """Every reason the model cannot become a GGUF file, raised before anything is written."""
    mt = getattr(model.config, "model_type", None)
    if mt not in ARCH:
        raise GGUFExportError(f"GGUF export supports the {', '.join(sorted(ARCH))} families, not {mt!r}")
    a = get_adapter(model)
    for i, layer in enumerate(a.decoder_layers(model)):
        attn = a.attention(layer)
        if getattr(attn, "qk_transform", None) is not None or any(
                getattr(m, "input_transform", None) is not None for m in a.layer_linears(layer).values()):
            raise GGUFExportError(
                f"layer {i} has an online Hadamard rotation (R3 on Q/K or R4 on down_proj), which llama.cpp cannot run; "
                f"rotate with R1/R2 only: rotation=quarot_offline (or rotation.r3=false rotation.r4=false)")
        if getattr(attn, "kv_quantizer", None) is not None:
            raise GGUFExportError("the KV cache is quantized in this model; llama.cpp quantizes its cache itself "
                                  "(--cache-type-k/v): export a weight-only model (quant=gguf_q4_0 or gguf_q8_0)")
        for role, m in a.layer_linears(layer).items():
            where = f"layer {i} {role}_proj"
            if getattr(m, "act_spec", None) is not None:
                raise GGUFExportError(f"{where} quantizes its input activations ({m.act_spec.short()}); llama.cpp has "
                                      f"no such activation quantizer: export a weight-only model (quant=gguf_q4_0)")
            if getattr(m, "adapter", None) is not None:
                raise GGUFExportError(f"{where} carries a LoRA adapter beside its quantized weight; GGUF holds one "
                                      f"weight per linear: merge it first (qat.merge=true) or export without QAT+LoRA")
            if not isinstance(m, (QuantLinear, torch.nn.Linear)):
                raise GGUFExportError(f"{where} is a {type(m).__name__}; export the fake-quant model before packing")
            _weight(m, where)
    head = a.head(model)
    if getattr(head, "act_spec", None) is not None:
        raise GGUFExportError("the lm_head quantizes its input activations; export a weight-only model")
    for name, m in (("embedding", a.embedding(model)), ("lm_head", head)):
        if not isinstance(m, (QuantLinear, QuantEmbedding, torch.nn.Linear, torch.nn.Embedding)):
            raise GGUFExportError(f"{name} is a {type(m).__name__}; export the fake-quant model before packing")
        _weight(m, name)


def _vocab(gguf, tokenizer_dir: Path):
    """gguf-py's vocabulary reader for the tokenizer in `tokenizer_dir` (Llama SentencePiece-style BPE with byte
    fallback, or GPT-2 byte-level BPE)."""
    from gguf.vocab import BpeVocab, LlamaHfVocab
    errors = []
    for cls in (LlamaHfVocab, BpeVocab):
        try:
            return cls(tokenizer_dir)
        except (FileNotFoundError, TypeError) as e:
            errors.append(f"{cls.__name__}: {e}")
    raise GGUFExportError(f"{tokenizer_dir}: no tokenizer.json of a kind GGUF export handles (Llama BPE with byte "
                          f"fallback, or GPT-2 byte-level BPE): {'; '.join(errors)}")


def export_gguf(model, path, tokenizer_dir, name: str | None = None, fp: str = "F16", overwrite: bool = False) -> Path:
    """Write `model` (fake-quant or FP, after `quantize_`) to the GGUF file `path` with the tokenizer of
    `tokenizer_dir`; unquantized matrices as `fp` (F16, or F32: exactly the FP weights, e.g. as the input of
    llama.cpp's own quantizer). Checks everything first; the file appears complete or not at all."""
    if fp not in ("F16", "F32"):
        raise ValueError(f"fp must be 'F16' or 'F32', got {fp!r}")
    gguf = _gguf()
    path, tokenizer_dir = check_file(path, WRITER, is_gguf, overwrite, "GGUF file"), Path(tokenizer_dir)
    check_exportable(model)
    vocab = _vocab(gguf, tokenizer_dir)
    c = model.config
    a = get_adapter(model)
    arch = ARCH[c.model_type]
    n_head, n_kv = c.num_attention_heads, a.num_kv_heads(model)
    hd = a.head_dim(model)

    tensors: list[tuple[str, str, object]] = []

    def add(gname: str, module, mname: str, permute: int | None = None):
        kind, payload = _weight(module, mname, fp)
        if kind in ("Q4_0", "Q8_0"):
            codes, scale = payload
            scale = scale.reshape(codes.shape[0], -1)
            if permute:
                codes, scale = permute_rows(codes, permute), permute_rows(scale, permute)
            tensors.append((gname, kind, encode_blocks(codes, scale, kind)))
        else:
            w = permute_rows(payload, permute) if permute else payload
            tensors.append((gname, kind, w.to(torch.float16 if kind == "F16" else torch.float32).numpy()))

    def add_vec(gname: str, t: torch.Tensor, permute: int | None = None):
        t = t.detach().float()
        tensors.append((gname, "F32", (permute_rows(t, permute) if permute else t).numpy()))

    perm = arch == "llama"
    add("token_embd.weight", a.embedding(model), "embedding")
    add_vec("output_norm.weight", a.norm(model).weight)
    if not a.tied_embeddings(model):
        add("output.weight", a.head(model), "lm_head")
    names = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "gate": "ffn_gate", "up": "ffn_up",
             "down": "ffn_down"}
    for i, layer in enumerate(a.decoder_layers(model)):
        add_vec(f"blk.{i}.attn_norm.weight", layer.get_submodule(a.input_norm).weight)
        add_vec(f"blk.{i}.ffn_norm.weight", layer.get_submodule(a.post_attn_norm).weight)
        for role, m in a.layer_linears(layer).items():
            p = {"q": n_head, "k": n_kv}.get(role) if perm else None
            add(f"blk.{i}.{names[role]}.weight", m, f"layer {i} {role}_proj", p)
            if getattr(m, "bias", None) is not None:
                add_vec(f"blk.{i}.{names[role]}.bias", m.bias, p)

    with write_file(path, WRITER, is_gguf, overwrite, "GGUF file") as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(name or getattr(c, "_name_or_path", "") or arch)
        w.add_context_length(c.max_position_embeddings)
        w.add_embedding_length(c.hidden_size)
        w.add_block_count(c.num_hidden_layers)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_rope_dimension_count(hd)
        w.add_key_length(hd)
        w.add_value_length(hd)
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        rope = getattr(c, "rope_parameters", None) or {}
        w.add_rope_freq_base(float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))))
        w.add_vocab_size(c.vocab_size)
        kinds = {k for _, k, _ in tensors}
        w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0 if "Q4_0" in kinds else
                        gguf.LlamaFileType.MOSTLY_Q8_0 if "Q8_0" in kinds else
                        gguf.LlamaFileType.MOSTLY_F16 if "F16" in kinds else gguf.LlamaFileType.ALL_F32)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        toks, scores, types = zip(*vocab.all_tokens())
        if len(toks) != c.vocab_size:
            raise GGUFExportError(f"tokenizer has {len(toks)} tokens, the model's vocabulary {c.vocab_size}")
        w.add_tokenizer_model(vocab.tokenizer_model)
        w.add_tokenizer_pre("gpt-2" if vocab.tokenizer_model == "gpt2" else "default")
        w.add_token_list(list(toks))
        w.add_token_scores(list(scores))
        w.add_token_types(list(types))
        gguf.SpecialVocab(tokenizer_dir, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=len(toks)).add_to_gguf(w)
        for gname, kind, data in tensors:
            raw = {"Q4_0": gguf.GGMLQuantizationType.Q4_0, "Q8_0": gguf.GGMLQuantizationType.Q8_0}.get(kind)
            w.add_tensor(gname, data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def is_gguf(path) -> bool:
    """Whether `path` starts with GGUF's magic (a file a GGUF export may replace)."""
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"
