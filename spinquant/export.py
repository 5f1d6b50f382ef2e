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
from .kernels.linear import holds_int4, holds_int8, int4_offset, load_kernel
from .models.adapter import get_adapter
from .models.attention import use_spinquant_attention
from .models.state import state_of
from .quant.apply import set_module
from .quant.linear import KVQuantizer, QuantLinear
from .quant.spec import QuantSpec
from .rotation.online import OnlineHadamard
from .writes import check_dir, write_dir

FORMAT = "spinquant-packed"
FORMAT_VERSION = 2  # 2: per-tensor and metadata checksums (version 1 files still load, unchecked)
READS = (1, 2)
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


def _hadamard_from(meta: dict | None) -> OnlineHadamard | None:
    """Inverse of `_hadamard_meta`."""
    return None if not meta else OnlineHadamard(meta["n"], meta["fallback"])


def _adapter_meta(a) -> dict | None:
    if a is None:
        return None
    return {"type": "lora", "in": a.in_features, "out": a.out_features, "rank": a.rank, "scaling": a.scaling,
            "pool_group": a.pool_group}


def save(model: nn.Module, path: str | os.PathLike, tokenizer=None, overwrite: bool = False) -> Path:
    """Write the packed model to folder `path`: written beside it and moved in at the end, so a failure leaves no
    partial output. A folder holding other files is refused unless `overwrite` (which keeps them; see
    `spinquant.writes`)."""
    path = check_dir(path, FORMAT, overwrite)
    if not any(isinstance(m, PackedLinear) for m in model.modules()):
        pack(model)
    with write_dir(path, FORMAT, overwrite) as tmp:
        _write(model, tmp, tokenizer)
    return path


def _write(model: nn.Module, tmp: Path, tokenizer) -> None:
    from safetensors.torch import save_file
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
        elif isinstance(m, QuantLinear) and m.qweight is None and (m.input_transform is not None or m.act_spec):
            # a 16-bit linear with an online R4 (a skipped down_proj under QuaRot) or quantized inputs: its weight is
            # saved as is (with the state dict); the transform and activation spec are recorded here
            if m.adapter is not None:
                raise ExportFormatError(f"{name}: a LoRA adapter on a 16-bit linear is not saved; merge it first")
            modules[name] = {"kind": "fp_linear", "in": m.in_features, "out": m.out_features,
                             "act_spec": m.act_spec.to_dict() if m.act_spec else None,
                             "input_transform": _hadamard_meta(m.input_transform)}
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
    st = state_of(model)
    qc = st.quant
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
            "dtype": str(st.packed_dtype or torch.bfloat16).replace("torch.", ""),
            "model_config": model.config.to_dict(), "quant_config": qc.to_dict() if qc is not None else None,
            "modules": modules, "attention": attention,
            "rotation": st.rotation.to_dict() if st.rotation is not None else None}
    meta = json.loads(json.dumps(meta, default=str))  # as it will read back
    meta["checksums"] = {"tensors": {k: tensor_sha256(v) for k, v in tensors.items()}, "meta": meta_sha256(meta)}
    save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    (tmp / META).write_text(json.dumps(meta, indent=1))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes as stored (row-major, its own dtype)."""
    import hashlib
    return hashlib.sha256(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def meta_sha256(meta: dict) -> str:
    """sha256 of the metadata without its checksums, in a canonical JSON form (sorted keys)."""
    import hashlib
    body = {k: v for k, v in meta.items() if k != "checksums"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _spec_of(d, what: str, where: Path) -> QuantSpec | None:
    if d is None:
        return None
    try:
        return QuantSpec.from_dict(d)
    except (ValueError, TypeError) as e:
        raise ExportFormatError(f"{where}: {what} is not a valid spec ({e})") from None


def _kernel_holds(kernel: str, s: QuantSpec) -> str | None:
    """Why the saved form `kernel` cannot hold weights of spec `s` (None if it can)."""
    if not s.enabled and kernel != "dequant":
        return f"a {s.bits}-bit weight spec is not quantized, but kernel {kernel!r} holds integer codes"
    if kernel == "int4" and not holds_int4(s):
        return f"kernel 'int4' holds at most 4-bit per-channel or grouped codes, not {s.short()}"
    if kernel == "int8" and not holds_int8(s):
        return f"kernel 'int8' holds 5-8-bit symmetric per-channel codes, not {s.short()}"
    return None


def _check_code_range(name: str, kernel: str, q: torch.Tensor | None, s: QuantSpec, where: Path) -> None:
    """The saved codes lie in the range of the recorded bit-width (an edited `bits` is caught here)."""
    if q is None:
        return
    if kernel == "int4":
        if q.dtype != torch.uint8:
            raise ExportFormatError(f"{where}: {name}.qweight has dtype {q.dtype}, expected uint8 (two 4-bit codes a byte)")
        lo, hi = s.qmin + int4_offset(s), s.qmax + int4_offset(s)  # the saved form u = code + offset
        u = torch.stack([q & 15, q >> 4])
    else:
        if q.dtype != torch.int8:
            raise ExportFormatError(f"{where}: {name}.qweight has dtype {q.dtype}, expected int8")
        lo, hi, u = s.qmin, s.qmax, q
    if u.numel() and (int(u.min()) < lo or int(u.max()) > hi):
        raise ExportFormatError(f"{where}: {name}.qweight holds codes outside the range of its recorded w_spec "
                                f"{s.short()} ([{int(u.min())}, {int(u.max())}] stored, [{lo}, {hi}] allowed): "
                                f"the spec or the tensor was changed")


def check_meta(meta: dict, model: nn.Module, where: Path) -> None:
    """The metadata against the model its `model_config` builds and against itself, before any tensor is read: every
    module exists with the recorded sizes, one attention entry per layer, specs valid and holdable by their kernel,
    the rotation consistent with the online transforms. Raises ExportFormatError naming the field."""
    from .rotation import ROTATIONS
    a = get_adapter(model)
    n_layers = len(a.decoder_layers(model))
    mods = meta.get("modules")
    if not isinstance(mods, dict) or not isinstance(meta.get("attention"), dict):
        raise ExportFormatError(f"{where}: `modules` and `attention` must be objects")
    have = dict(model.named_modules())
    for name, d in mods.items():
        m = have.get(name)
        kind = d.get("kind") if isinstance(d, dict) else None
        if kind not in ("linear", "fp_linear", "embedding"):
            raise ExportFormatError(f"{where}: module {name!r} has kind {kind!r} (expected linear, fp_linear or "
                                    f"embedding)")
        if m is None:
            raise ExportFormatError(f"{where}: module {name!r} does not exist in the model its model_config describes "
                                    f"({n_layers} layers, hidden {model.config.hidden_size})")
        if kind in ("linear", "fp_linear") and (
                not isinstance(m, nn.Linear) or (m.in_features, m.out_features) != (d.get("in"), d.get("out"))):
            got = (getattr(m, "in_features", None), getattr(m, "out_features", None))
            raise ExportFormatError(f"{where}: module {name!r} is recorded as a {'16-bit ' * (kind == 'fp_linear')}"
                                    f"linear {d.get('in')} -> {d.get('out')}, but model_config makes it "
                                    f"{type(m).__name__} {got[0]} -> {got[1]}")
        if kind == "fp_linear":
            act = _spec_of(d.get("act_spec"), f"{name}.act_spec", where)
            if act is not None and act.enabled:
                try:
                    act.check_shape(m.in_features, f"{name} input")
                except ValueError as e:
                    raise ExportFormatError(f"{where}: {e}") from None
        elif kind == "linear":
            w = _spec_of(d.get("w_spec"), f"{name}.w_spec", where)
            act = _spec_of(d.get("act_spec"), f"{name}.act_spec", where)
            why = _kernel_holds(d.get("kernel"), w) if w is not None else "w_spec is missing"
            if why:
                raise ExportFormatError(f"{where}: module {name!r}: {why}")
            if act is not None and act.enabled and (act.granularity != "token" or act.bits > 8):
                raise ExportFormatError(f"{where}: module {name!r}: act_spec {act.short()} is not a per-token activation "
                                        f"quantizer of at most 8 bits (the packed kernels' form)")
        else:
            if not isinstance(m, nn.Embedding) or (m.num_embeddings, m.embedding_dim) != (d.get("num"), d.get("dim")):
                got = f"{getattr(m, 'num_embeddings', '?')} x {getattr(m, 'embedding_dim', '?')}"
                raise ExportFormatError(f"{where}: embedding {name!r} is recorded as {d.get('num')} x {d.get('dim')}, "
                                        f"but model_config makes it {got}")
            spec = _spec_of(d.get("spec"), f"{name}.spec", where)
            if spec is None or spec.bits > 8 or spec.granularity not in ("channel", "tensor"):
                raise ExportFormatError(f"{where}: embedding {name!r}: spec must be an int8-or-narrower per-row spec")
    keys = set(meta["attention"])
    if keys != {str(i) for i in range(n_layers)}:
        raise ExportFormatError(f"{where}: `attention` has entries for layers {sorted(keys, key=lambda k: (len(k), k))}, "
                                f"but model_config has {n_layers} layers (0..{n_layers - 1})")
    for i, d in meta["attention"].items():
        kv = (d or {}).get("kv")
        if kv is not None:
            for part in ("k", "v"):
                spec = _spec_of(kv.get(part) if isinstance(kv, dict) else None, f"attention {i} kv.{part}", where)
                if spec is None or not spec.enabled:
                    raise ExportFormatError(f"{where}: attention {i}: kv.{part} must be a quantized spec")
                try:
                    spec.check_shape(a.head_dim(model), "head_dim")
                except ValueError as e:
                    raise ExportFormatError(f"{where}: attention {i} kv.{part}: {e}") from None
    rot = meta.get("rotation")
    if rot is not None:
        if not isinstance(rot, dict) or rot.get("name") not in ROTATIONS:
            raise ExportFormatError(f"{where}: rotation {rot.get('name') if isinstance(rot, dict) else rot!r} is not a "
                                    f"known rotation ({', '.join(ROTATIONS)})")
        cfg = rot.get("config") or {}
        r3 = rot["name"] != "none" and bool(cfg.get("r3", False))
        r4 = rot["name"] != "none" and bool(cfg.get("r4", False))
        has_r3 = [bool((d or {}).get("qk_transform")) for d in meta["attention"].values()]
        downs = [d for n, d in mods.items() if d["kind"] in ("linear", "fp_linear")
                 and n.endswith("." + a.linear_names()["down"])]
        has_r4 = [bool(d.get("input_transform")) for d in downs]
        if any(h != r3 for h in has_r3) or any(h != r4 for h in has_r4):
            raise ExportFormatError(f"{where}: rotation {rot['name']!r} (r3={r3}, r4={r4}) does not match the online "
                                    f"transforms recorded (R3 on {sum(has_r3)} of {len(has_r3)} layers, R4 on "
                                    f"{sum(has_r4)} of {len(has_r4)} recorded down_proj)")


def _take(tensors: dict, name: str, shape: tuple | None, where: Path) -> torch.Tensor:
    if name not in tensors:
        raise ExportFormatError(f"{where}: tensor {name!r} is missing (file truncated or written by another version?)")
    t = tensors.pop(name)
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ExportFormatError(f"{where}: tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)} "
                                f"from {META}")
    tensors.verify(name)
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
    _check_code_range(name, kernel, t.get("qweight"), w_spec, where)
    m = PackedLinear.from_export(t, K, N, w_spec, act_spec, load_kernel(kernel, w_spec, act_spec))
    m.input_transform = _hadamard_from(d.get("input_transform"))
    if d.get("adapter"):
        from .qat.lora import LoRA
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
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportFormatError(f"{path / META} is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ExportFormatError(f"{path / META} is not a JSON object")
    if meta.get("format") != FORMAT:
        raise ExportFormatError(f"{path / META}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("format_version") not in READS:
        raise ExportFormatError(f"{path / META}: format_version {meta.get('format_version')!r} is not supported by "
                                f"this spinquant (reads versions {', '.join(map(str, READS))}); upgrade spinquant or "
                                f"re-export")
    sums = meta.get("checksums")
    meta_unchanged = sums is None or (isinstance(sums, dict) and meta_sha256(meta) == sums.get("meta"))
    if meta["format_version"] >= 2 and not (isinstance(sums, dict) and isinstance(sums.get("tensors"), dict)
                                           and isinstance(sums.get("meta"), str)):
        raise ExportFormatError(f"{path / META}: the checksums of a version-2 file are missing or malformed")
    if sums is None:
        import warnings
        warnings.warn(f"{path} was saved by an older spinquant (format version 1, no checksums): its contents cannot "
                      f"be verified; re-export it to add them", stacklevel=2)
    try:  # tensors are read one module at a time, keeping peak memory at the packed model's size
        tensors = _LazyTensors(path / WEIGHTS, sums["tensors"] if sums else None)
    except (ValueError, KeyError, TypeError, OSError) as e:
        if isinstance(e, ExportFormatError):
            raise
        raise ExportFormatError(f"{path / WEIGHTS} is corrupt or unreadable: {e}") from None
    if meta.get("dtype") not in DTYPES:
        raise ExportFormatError(f"{path / META}: dtype {meta.get('dtype')!r} is not one of {list(DTYPES)}")
    dtype = DTYPES[meta["dtype"]]
    cfg = dict(meta["model_config"])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    where = path / WEIGHTS
    mods = meta["modules"]
    check_meta(meta, model, path / META)
    for name, d in mods.items():  # linears first: a shared embedding reads the lm_head's table
        if d["kind"] == "linear":
            set_module(model, name, _linear_from(tensors, name, d, where))
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
        set_module(model, name, PackedEmbedding(codes, scale, zero, spec, dtype))
    missing = [k for k, v in model.state_dict(keep_vars=True).items() if v.is_meta and k not in tensors
               and not _is_tied_copy(model, k)]
    if missing:
        raise ExportFormatError(f"{where}: tensor(s) missing: {missing[:5]}{' …' if len(missing) > 5 else ''}")
    model.load_state_dict(tensors.rest(), strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False) and not isinstance(model.get_output_embeddings(), PackedLinear):
        model.tie_weights()
    _rebuild_meta_buffers(model)
    for name, d in mods.items():  # 16-bit linears with an online transform or quantized inputs
        if d["kind"] == "fp_linear":
            ql = QuantLinear.from_linear(model.get_submodule(name), None, _spec(d.get("act_spec")))
            ql.input_transform = _hadamard_from(d.get("input_transform"))
            set_module(model, name, ql)
    a = get_adapter(model)
    for i, layer in enumerate(a.decoder_layers(model)):
        d = meta["attention"].get(str(i), {})
        attn = a.attention(layer)
        if d.get("qk_transform"):
            attn.qk_transform = _hadamard_from(d["qk_transform"])
        if d.get("kv"):
            attn.kv_quantizer = KVQuantizer(QuantSpec.from_dict(d["kv"]["k"]), QuantSpec.from_dict(d["kv"]["v"]))
    use_spinquant_attention(model)
    st = state_of(model)
    st.packed_dtype = dtype
    if meta.get("rotation"):
        from .rotation import RotationState
        st.rotation = RotationState(**meta["rotation"])
    if meta.get("quant_config"):
        from .quant.schemes import QuantConfig
        st.quant = QuantConfig.from_dict({k: v for k, v in meta["quant_config"].items()})
    if not meta_unchanged:
        raise ExportFormatError(f"{path / META} was changed after it was saved (its checksum does not match): an "
                                f"edited spec, rotation or config would change the computation or silently fail to; "
                                f"re-export the model instead of editing the file")
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

    def __init__(self, path: Path, checksums: dict | None = None):
        self.path, self.checksums, size = path, checksums, path.stat().st_size
        self.mismatched: set[str] = set()
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
        if checksums is not None and set(checksums) != self.names:
            extra, missing = sorted(self.names - set(checksums)), sorted(set(checksums) - self.names)
            raise ExportFormatError(f"{path}: the file's tensors differ from those recorded at save: "
                                    + "; ".join(([f"{missing[:5]} missing from the file"] if missing else [])
                                                + ([f"{extra[:5]} in the file but not recorded"] if extra else [])))

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
        if self.checksums is not None:
            import hashlib
            if hashlib.sha256(buf).hexdigest() != self.checksums[name]:
                self.mismatched.add(name)
        if not buf:
            return torch.empty(e["shape"], dtype=self.DTYPES[e["dtype"]])
        return torch.frombuffer(buf, dtype=self.DTYPES[e["dtype"]]).reshape(e["shape"])

    def verify(self, name: str) -> None:
        """Raise if the bytes read for `name` do not match its recorded checksum (after the caller's shape checks,
        which give a more specific reason)."""
        if name in self.mismatched:
            raise ExportFormatError(f"{self.path}: tensor {name!r} does not match the checksum recorded when it was "
                                    f"saved: the file is corrupt (or was modified); re-export or copy it again")

    def rest(self) -> dict[str, torch.Tensor]:
        out = {n: self.pop(n) for n in sorted(self.names)}
        for n in out:
            self.verify(n)
        return out


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
            set_module(model, name, type(m)(config=model.config))
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise ExportFormatError(f"parameters not found in the saved file: {left[:5]}")
