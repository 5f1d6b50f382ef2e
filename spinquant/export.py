"""Save / load a packed quantized model: safetensors + a JSON that records every spec and online rotation.

    spinquant.export.save(model, "out/my-w4a8", tokenizer)   # packs the model first if needed
    model, tok = spinquant.export.load("out/my-w4a8")         # no FP checkpoint needed; generate() works

Folder layout: `model.safetensors` (packed weights at their bit-width, scales, norms, 16-bit leftovers),
`spinquant.json` (format version, the HF model config, the quantization config, one entry per packed
module with its specs, kernel, online transform and adapter, one per attention layer with R3 and KV
specs) and the tokenizer files. R1/R2 are fused into the saved weights; R3/R4 are recorded as online
Hadamards of a given size. Every mismatch on load is a `ExportFormatError` that names what is wrong.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from .kernels import PackedEmbedding, PackedLinear, pack
from .kernels.linear import load_kernel
from .models.adapter import get_adapter
from .models.attention import use_spinquant_attention
from .quant.apply import _set
from .quant.linear import KVQuantizer
from .quant.spec import QuantSpec
from .rotation.online import OnlineHadamard

FORMAT = "spinquant-packed"
FORMAT_VERSION = 1
WEIGHTS, META = "model.safetensors", "spinquant.json"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


class ExportFormatError(ValueError):
    """A saved model that cannot be loaded as it is: the message says which file / tensor / field."""


def check_fused_only(rotation_cfg, qat_cfg, fmt: str, error: type) -> None:
    """For formats holding one plain weight per linear (GGUF, compressed-tensors): refuse, from the run's config,
    online R3/R4 Hadamards and LoRA adapters kept beside the quantized weights, each naming the fix."""
    if rotation_cfg is not None and (getattr(rotation_cfg, "r3", False) or getattr(rotation_cfg, "r4", False)):
        raise error(f"rotation {rotation_cfg.name!r} adds online Hadamards (r3/r4), which {fmt} cannot run; use "
                    f"rotation={rotation_cfg.name}_offline (R1/R2 only)")
    if qat_cfg is not None and qat_cfg.name == "lora" and not qat_cfg.merge:
        raise error(f"QAT+LoRA keeps 16-bit adapters beside the quantized weights, which {fmt} cannot hold; set "
                    f"qat.merge=true (with qat.lora.qa_lora=true) or export another model")


def _spec(d: dict | None) -> QuantSpec | None:
    return None if d is None else QuantSpec.from_dict(d)


def _hadamard_meta(t) -> dict | None:
    if t is None:
        return None
    if not isinstance(t, OnlineHadamard):
        raise ExportFormatError(f"cannot save online transform {type(t).__name__}: only OnlineHadamard is supported")
    return {"type": "hadamard", "n": t.n, "fallback": t.fallback}


def _adapter_meta(a) -> dict | None:
    if a is None:
        return None
    return {"type": "lora", "in": a.in_features, "out": a.out_features, "rank": a.rank, "scaling": a.scaling,
            "pool_group": a.pool_group}


def save(model: nn.Module, path: str | os.PathLike, tokenizer=None) -> Path:
    """Write the packed model to folder `path` (atomically: a temporary folder renamed at the end)."""
    from safetensors.torch import save_file
    if not any(isinstance(m, PackedLinear) for m in model.modules()):
        pack(model)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, dict] = {}
    covered: set[str] = set()
    head = model.get_output_embeddings()
    for name, m in model.named_modules():
        if isinstance(m, PackedLinear):
            for k, v in m.export_tensors().items():
                tensors[f"{name}.{k}"] = v.contiguous()
            if m.adapter is not None:
                tensors[f"{name}.adapter.A"] = m.adapter.A.detach().to(torch.bfloat16).contiguous()
                tensors[f"{name}.adapter.B"] = m.adapter.B.detach().to(torch.bfloat16).contiguous()
            modules[name] = {"kind": "linear", "kernel": m.portable_kernel, "in": m.in_features, "out": m.out_features,
                             "w_spec": m.w_spec.to_dict(), "act_spec": m.act_spec.to_dict() if m.act_spec else None,
                             "bias": m.bias is not None, "input_transform": _hadamard_meta(m.input_transform),
                             "adapter": _adapter_meta(m.adapter)}
            covered.add(name)
        elif isinstance(m, PackedEmbedding):
            table = head.int8_table() if isinstance(head, PackedLinear) else None
            shared = table is not None and m.codes.data_ptr() == table.data_ptr()
            if not shared:
                tensors[f"{name}.codes"] = m.codes
            tensors[f"{name}.scale"] = m.scale[:, 0].contiguous()
            if m.zero is not None:
                tensors[f"{name}.zero"] = m.zero[:, 0].contiguous()
            modules[name] = {"kind": "embedding", "num": m.num_embeddings, "dim": m.embedding_dim,
                             "spec": m.spec.to_dict(), "codes_from": "lm_head.qweight" if shared else None}
            covered.add(name)
    attention = {}
    a = get_adapter(model)
    for i, layer in enumerate(a.decoder_layers(model)):
        attn = a.attention(layer)
        kvq = getattr(attn, "kv_quantizer", None)
        attention[str(i)] = {"qk_transform": _hadamard_meta(getattr(attn, "qk_transform", None)),
                             "kv": None if kvq is None else {"k": kvq.k_spec.to_dict(), "v": kvq.v_spec.to_dict()}}
    seen = {}
    for k, v in model.state_dict().items():
        owner = k.rsplit(".", 1)[0]
        if any(owner == c or owner.startswith(c + ".") for c in covered):
            continue
        if v.data_ptr() in seen:  # tied (unquantized) embedding / lm_head: stored once
            continue
        seen[v.data_ptr()] = k
        tensors[k] = v.detach().contiguous()
    qc = getattr(model, "quant_config", None)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
            "dtype": str(getattr(model, "packed_dtype", torch.bfloat16)).replace("torch.", ""),
            "model_config": model.config.to_dict(), "quant_config": qc.to_dict() if qc is not None else None,
            "modules": modules, "attention": attention,
            "rotation": state.to_dict() if (state := getattr(model, "rotation_state", None)) is not None else None}
    save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    (tmp / META).write_text(json.dumps(meta, indent=1, default=str))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    if path.exists():
        import shutil
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def _take(tensors: dict, name: str, shape: tuple | None, where: Path) -> torch.Tensor:
    if name not in tensors:
        raise ExportFormatError(f"{where}: tensor {name!r} is missing (file truncated or written by another version?)")
    t = tensors.pop(name)
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ExportFormatError(f"{where}: tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)} "
                                f"from {META}")
    return t


def _linear_from(tensors, name, d, where) -> PackedLinear:
    N, K, kernel = d["out"], d["in"], d["kernel"]
    w_spec, act_spec = QuantSpec.from_dict(d["w_spec"]), _spec(d["act_spec"])
    t = {}
    if d["bias"]:
        t["bias"] = _take(tensors, f"{name}.bias", (N,), where)
    if kernel == "int4":
        groups = 1 if w_spec.granularity in ("channel", "tensor") else K // w_spec.group_size
        t["qweight"] = _take(tensors, f"{name}.qweight", (N, (K + 1) // 2), where)
        t["scale"] = _take(tensors, f"{name}.scale", (N, groups), where)
        if not w_spec.symmetric:
            t["zero"] = _take(tensors, f"{name}.zero", (N, groups), where)
    elif kernel == "int8":
        t["qweight"] = _take(tensors, f"{name}.qweight", (N, K), where)
        t["scale"] = _take(tensors, f"{name}.scale", (N,), where)
    elif kernel == "dequant":
        t["weight"] = _take(tensors, f"{name}.weight", (N, K), where)
    else:
        raise ExportFormatError(f"{where}: module {name!r} has unknown kernel {kernel!r}")
    m = PackedLinear.from_export(t, K, N, w_spec, act_spec, load_kernel(kernel, w_spec, act_spec))
    if d.get("input_transform"):
        m.input_transform = OnlineHadamard(d["input_transform"]["n"], d["input_transform"]["fallback"])
    if d.get("adapter"):
        from qat.lora import LoRA
        ad = d["adapter"]
        lora = LoRA(ad["in"], ad["out"], ad["rank"], alpha=ad["scaling"] * ad["rank"], pool_group=ad["pool_group"])
        a_in = ad["in"] // ad["pool_group"] if ad["pool_group"] else ad["in"]
        lora.A.data = _take(tensors, f"{name}.adapter.A", (ad["rank"], a_in), where).float()
        lora.B.data = _take(tensors, f"{name}.adapter.B", (ad["out"], ad["rank"]), where).float()
        m.adapter = lora.requires_grad_(False)
    return m


def load(path: str | os.PathLike, device: str = "cpu"):
    """(packed model, tokenizer or None) from a folder written by `save`; the FP checkpoint is not needed."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / META).is_file() or not (path / WEIGHTS).is_file():
        raise ExportFormatError(f"{path} is not a saved spinquant model: expected {META} and {WEIGHTS} in it")
    try:
        meta = json.loads((path / META).read_text())
    except json.JSONDecodeError as e:
        raise ExportFormatError(f"{path / META} is not valid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise ExportFormatError(f"{path / META}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ExportFormatError(f"{path / META}: format_version {meta.get('format_version')!r} is not supported by "
                                f"this spinquant (reads version {FORMAT_VERSION}); upgrade spinquant or re-export")
    try:  # tensors are read one module at a time, keeping peak memory at the packed model's size
        tensors = _LazyTensors(path / WEIGHTS)
    except (ValueError, KeyError, TypeError, OSError) as e:
        if isinstance(e, ExportFormatError):
            raise
        raise ExportFormatError(f"{path / WEIGHTS} is corrupt or unreadable: {e}") from None
    dtype = DTYPES[meta["dtype"]]
    cfg = dict(meta["model_config"])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    where = path / WEIGHTS
    mods = meta["modules"]
    for name, d in mods.items():  # linears first: a shared embedding reads the lm_head's table
        if d["kind"] == "linear":
            _set(model, name, _linear_from(tensors, name, d, where))
            _trim()
    for name, d in mods.items():
        if d["kind"] != "embedding":
            continue
        spec = QuantSpec.from_dict(d["spec"])
        if d.get("codes_from"):
            codes = model.get_output_embeddings().int8_table()
        else:
            codes = _take(tensors, f"{name}.codes", (d["num"], d["dim"]), where)
        scale = _take(tensors, f"{name}.scale", (d["num"],), where)
        zero = None if spec.symmetric else _take(tensors, f"{name}.zero", (d["num"],), where)
        if codes.dtype != torch.int8:
            raise ExportFormatError(f"{where}: {name}.codes has dtype {codes.dtype}, expected int8")
        _set(model, name, PackedEmbedding(codes, scale, zero, spec, dtype))
    missing = [k for k, v in model.state_dict(keep_vars=True).items() if v.is_meta and k not in tensors
               and not _is_tied_copy(model, k)]
    if missing:
        raise ExportFormatError(f"{where}: tensor(s) missing: {missing[:5]}{' …' if len(missing) > 5 else ''}")
    model.load_state_dict(tensors.rest(), strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False) and not isinstance(model.get_output_embeddings(), PackedLinear):
        model.tie_weights()
    _rebuild_meta_buffers(model)
    a = get_adapter(model)
    for i, layer in enumerate(a.decoder_layers(model)):
        d = meta["attention"].get(str(i), {})
        attn = a.attention(layer)
        if d.get("qk_transform"):
            attn.qk_transform = OnlineHadamard(d["qk_transform"]["n"], d["qk_transform"]["fallback"])
        if d.get("kv"):
            attn.kv_quantizer = KVQuantizer(QuantSpec.from_dict(d["kv"]["k"]), QuantSpec.from_dict(d["kv"]["v"]))
    use_spinquant_attention(model)
    model.packed_dtype = dtype
    model.spinquant_meta = meta
    if meta.get("rotation"):
        from .rotation import RotationState
        model.rotation_state = RotationState(**meta["rotation"])
    if meta.get("quant_config"):
        from .quant.schemes import QuantConfig
        model.quant_config = QuantConfig.from_dict({k: v for k, v in meta["quant_config"].items()})
    model.eval().to(device)
    tokenizer = None
    if (path / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer


class _LazyTensors:
    """The saved tensors, each read from the file (plain reads, no mmap) when `pop`ped: peak memory stays
    at the packed model plus one module's buffers, and no file pages are counted in the process's RSS."""

    DTYPES = {"U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
              "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
              "BOOL": torch.bool}

    def __init__(self, path: Path):
        self.path, size = path, path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= size - 8:
                raise ExportFormatError(f"{path} is corrupt: header length {n} does not fit a file of {size} bytes")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self.start, self.entries = 8 + n, header
        for name, e in header.items():
            if e.get("dtype") not in self.DTYPES or e["data_offsets"][1] > size - self.start:
                raise ExportFormatError(f"{path} is corrupt or truncated: tensor {name!r} ({e.get('dtype')}, bytes "
                                        f"{e['data_offsets']}) lies outside the file's {size - self.start} data bytes")
        self.names = set(header)

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def pop(self, name: str) -> torch.Tensor:
        self.names.remove(name)
        e = self.entries[name]
        a, b = e["data_offsets"]
        buf = bytearray(b - a)
        with open(self.path, "rb") as f:
            f.seek(self.start + a)
            f.readinto(buf)
        if not buf:
            return torch.empty(e["shape"], dtype=self.DTYPES[e["dtype"]])
        return torch.frombuffer(buf, dtype=self.DTYPES[e["dtype"]]).reshape(e["shape"])

    def rest(self) -> dict[str, torch.Tensor]:
        return {n: self.pop(n) for n in sorted(self.names)}


def _trim() -> None:
    """Give freed heap memory back to the OS (glibc), so transient unpacking buffers do not pile up in RSS."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _is_tied_copy(model, key: str) -> bool:
    return key.endswith("lm_head.weight") and getattr(model.config, "tie_word_embeddings", False)


def _rebuild_meta_buffers(model) -> None:
    """Non-persistent buffers (RoPE's inv_freq) are not saved: rebuild their modules on the CPU."""
    for name, m in list(model.named_modules()):
        if any(b.is_meta for b in m.buffers(recurse=False)):
            if "Rotary" not in type(m).__name__:
                bad = [n for n, b in m.named_buffers(recurse=False) if b.is_meta]
                raise ExportFormatError(f"module {name!r} has buffers {bad} that are neither saved nor rebuildable")
            _set(model, name, type(m)(config=model.config))
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise ExportFormatError(f"parameters not found in the saved file: {left[:5]}")
