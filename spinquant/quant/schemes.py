"""`QuantConfig` (what to quantize, how) and the named scheme presets."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, replace

from .spec import QuantSpec

FP = QuantSpec()
SPEC_FIELDS = ("weight", "act", "kv", "embed", "lm_head", "lm_head_act")


@dataclass(frozen=True)
class ModuleOverride:
    """Per-module exception to a QuantConfig: decoder linears whose full name matches `modules` (fnmatch
    pattern, e.g. "*.down_proj", "model.layers.0.*") take `weight` / `act` fields merged over the config's
    specs (e.g. {"bits": 8}), or stay in full precision (`skip`)."""

    modules: str
    weight: dict = field(default_factory=dict)
    act: dict = field(default_factory=dict)
    skip: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> "ModuleOverride":
        d = dict(d)
        unknown = sorted(set(d) - {"modules", "weight", "act", "skip"})
        if unknown or not isinstance(d.get("modules"), str):
            raise ValueError(f"quant.overrides entry {d}: needs `modules` (a module-name pattern) and only weight, act, "
                             f"skip" + (f"; unknown key(s) {unknown}" if unknown else ""))
        if d.get("skip") and (d.get("weight") or d.get("act")):
            raise ValueError(f"quant.overrides entry for {d['modules']!r}: skip=true with weight/act fields is ambiguous")
        for k in ("weight", "act"):
            QuantSpec.from_dict({**QuantSpec().to_dict(), **dict(d.get(k) or {})})  # unknown spec keys: an error now
        return cls(d["modules"], dict(d.get("weight") or {}), dict(d.get("act") or {}), bool(d.get("skip", False)))

    def to_dict(self) -> dict:
        return {"modules": self.modules, "weight": dict(self.weight), "act": dict(self.act), "skip": self.skip}

    def over(self, base: QuantSpec, role: str) -> QuantSpec:
        """`base` with this override's `role` ("weight" or "act") fields merged over it; base itself if none."""
        fields = getattr(self, role)
        return QuantSpec.from_dict({**base.to_dict(), **fields}) if fields else base


@dataclass(frozen=True)
class QuantConfig:
    """A whole-model quantization scheme.

    weight/act apply to every linear inside the decoder layers (act = that linear's input, dynamic);
    kv to keys and values inside attention; embed and lm_head(+lm_head_act) stay 16-bit by default.
    method names a registered weight quantizer (`rtn`, `gptq`, ...) and method_options its kwargs.
    """

    weight: QuantSpec | None = None  # None: the `scheme` preset's value
    act: QuantSpec | None = None
    kv: QuantSpec | None = None
    method: str | None = None
    method_options: dict = field(default_factory=dict)
    embed: QuantSpec | None = None
    lm_head: QuantSpec | None = None
    lm_head_act: QuantSpec | None = None
    scheme: str = "W16A16"
    group_fallback: str = "error"  # "error" | "channel" | "none" (FP): layers whose width a group does not divide
    # calibrated quantizers (GPTQ): calibrate each layer on the quantized model's activations (act / KV quantization
    # on in the layers already done, Hessian of the quantized input), as llm-compressor and GPTQModel do
    calib_act_quant: bool = False
    # per-module exceptions, in order (a later match refines an earlier one): see ModuleOverride
    overrides: tuple[ModuleOverride, ...] = ()

    def __post_init__(self):
        """Fields left unset take the `scheme` preset's values: QuantConfig(scheme="W4A8") is the W4A8 preset
        (not a W16A16 model labelled W4A8); an unknown scheme name is refused."""
        presets = globals().get("SCHEMES")  # None while the presets themselves are being built
        if presets is not None and self.scheme not in presets:
            raise ValueError(f"unknown quantization scheme {self.scheme!r}; presets: {', '.join(presets)}")
        base = presets[self.scheme] if presets is not None else None
        for k in SPEC_FIELDS + ("method",):
            if getattr(self, k) is None:
                object.__setattr__(self, k, getattr(base, k) if base is not None else ("rtn" if k == "method" else FP))
        if self.group_fallback not in ("error", "channel", "none"):
            raise ValueError(f"group_fallback must be 'error', 'channel' or 'none', got {self.group_fallback!r}")
        object.__setattr__(self, "overrides", tuple(o if isinstance(o, ModuleOverride) else ModuleOverride.from_dict(o)
                                                    for o in self.overrides))

    def specs_for(self, name: str, in_features: int) -> tuple[QuantSpec, QuantSpec] | None:
        """(weight spec, input activation spec) of the decoder linear called `name` (its full module name), after
        the matching overrides and the group fallback; None when an override skips it (it stays FP)."""
        w, a = self.weight, self.act
        for o in self.overrides:
            if fnmatch.fnmatchcase(name, o.modules):
                if o.skip:
                    return None
                w, a = o.over(w, "weight"), o.over(a, "act")
        return self._fallback(w, in_features, f"{name} weight"), a

    def check_overrides(self, names) -> None:
        """Every override pattern must match at least one of the decoder linears `names` (a pattern matching
        nothing would silently do nothing)."""
        names = list(names)
        for o in self.overrides:
            if not any(fnmatch.fnmatchcase(n, o.modules) for n in names):
                raise ValueError(f"quant.overrides pattern {o.modules!r} matches no decoder linear; names look like "
                                 f"{names[0]!r} … {names[-1]!r}")

    def weight_spec_for(self, in_features: int, what: str = "weight") -> QuantSpec:
        """The weight spec for a linear with `in_features` inputs (per-channel fallback if allowed)."""
        return self._fallback(self.weight, in_features, what)

    def _fallback(self, w: QuantSpec, in_features: int, what: str) -> QuantSpec:
        if w.enabled and w.granularity == "group" and in_features % w.group_size:
            if self.group_fallback == "channel":
                return replace(w, granularity="channel", group_size=None)
            if self.group_fallback == "none":  # left in full precision (llama.cpp's fallback for such tensors too)
                return FP
            w.check_shape(in_features, what + " (set quant.group_fallback=channel to use per-channel there)")
        return w

    def label(self) -> str:
        """`W{w}A{a}` plus `KV{kv}` when the KV cache is quantized."""
        s = f"W{self.weight.bits}A{self.act.bits}"
        s += f"KV{self.kv.bits}" if self.kv.enabled else ""
        return s + ("-mixed" if self.overrides else "")

    def to_dict(self) -> dict:
        d = {k: getattr(self, k).to_dict() for k in SPEC_FIELDS}
        return {**d, "method": self.method, "method_options": dict(self.method_options), "scheme": self.scheme,
                "group_fallback": self.group_fallback, "calib_act_quant": self.calib_act_quant,
                **({"overrides": [o.to_dict() for o in self.overrides]} if self.overrides else {})}

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        """Build from a (Hydra) dict: `scheme` picks a preset, other keys override it field by field."""
        d = dict(d)
        name = d.pop("scheme", "W16A16")
        base = preset(name)
        kw = {}
        for k in SPEC_FIELDS:
            if d.get(k):
                kw[k] = QuantSpec.from_dict({**getattr(base, k).to_dict(), **dict(d.pop(k))})
            d.pop(k, None)
        for k in ("method", "group_fallback", "calib_act_quant"):
            if k in d:
                kw[k] = d.pop(k)
        if d.get("method_options"):
            kw["method_options"] = dict(d.pop("method_options"))
        d.pop("method_options", None)
        if d.get("overrides"):
            kw["overrides"] = tuple(ModuleOverride.from_dict(o) for o in d.pop("overrides"))
        d.pop("overrides", None)
        if d:
            raise ValueError(f"unknown quant config key(s) {sorted(d)}; known: scheme, method, method_options, "
                             f"group_fallback, calib_act_quant, overrides, weight, act, kv, embed, lm_head, "
                             f"lm_head_act")
        return replace(base, **kw)


def _w(bits, group=None, sym=True, clip="none", scale_dtype=None):
    return QuantSpec(bits=bits, symmetric=sym, granularity="group" if group else "channel", group_size=group,
                     clip_search=clip, scale_dtype=scale_dtype)


def _a(bits, clip=1.0, sym=False):
    return QuantSpec(bits=bits, symmetric=sym, granularity="token", dynamic=True, clip_ratio=clip)


# Presets. A4/KV4 clip ratios 0.9/0.95 follow QuaRot; weights use an MSE clip search (GPTQ/QuaRot do too).
SCHEMES: dict[str, QuantConfig] = {
    "W16A16": QuantConfig(scheme="W16A16"),
    "W8A8": QuantConfig(weight=_w(8), act=_a(8), scheme="W8A8"),
    "W4A16": QuantConfig(weight=_w(4, clip="mse"), scheme="W4A16"),
    "W4A16-g128": QuantConfig(weight=_w(4, 128, clip="mse"), scheme="W4A16-g128"),
    # Meta's on-device Llama 3.2 recipe: int4 sym g32 weights, int8 asym per-token dynamic activations.
    "W4A8": QuantConfig(weight=_w(4, 32, clip="mse"), act=_a(8), scheme="W4A8"),
    # weight-only low-bit rows of the QAT table (group 64)
    "W3A16-g64": QuantConfig(weight=_w(3, 64, clip="mse"), scheme="W3A16-g64"),
    "W2A16-g64": QuantConfig(weight=_w(2, 64, clip="mse"), scheme="W2A16-g64"),
    # the rotation table's middle column: per-channel int4 weights, int8 activations and KV cache
    "W4A8KV8": QuantConfig(weight=_w(4, clip="mse"), act=_a(8),
                           kv=QuantSpec(bits=8, symmetric=False, granularity="token", dynamic=True),
                           scheme="W4A8KV8"),
    # GGUF's block formats, exactly: symmetric blocks of 32 with one fp16 scale (llama.cpp dequantizes q·d), so the
    # codes and scales export bit for bit (spinquant.gguf_export). Decoder linears at Q4_0 / Q8_0; the embedding and
    # lm_head at Q8_0 (llama.cpp's own Q4_0 files keep the output tensor at higher precision too).
    "GGUF-Q4_0": QuantConfig(weight=_w(4, 32, clip="mse", scale_dtype="float16"), embed=_w(8, 32, scale_dtype="float16"),
                             lm_head=_w(8, 32, scale_dtype="float16"), scheme="GGUF-Q4_0"),
    "GGUF-Q8_0": QuantConfig(weight=_w(8, 32, scale_dtype="float16"), embed=_w(8, 32, scale_dtype="float16"),
                             lm_head=_w(8, 32, scale_dtype="float16"), scheme="GGUF-Q8_0"),
    # Meta's on-device recipe as XNNPACK runs it (ExecuTorch, spinquant.et_export): decoder linears int4 sym g32 with
    # bf16 scales (XNNPACK stores grouped scales in bf16) and int8 asym per-token dynamic activations; lm_head int8
    # per-channel weights with int8 dynamic activations; embedding int8 per-channel.
    "ExecuTorch-W4A8": QuantConfig(weight=_w(4, 32, clip="mse", scale_dtype="bfloat16"), act=_a(8), embed=_w(8),
                                   lm_head=_w(8), lm_head_act=_a(8), scheme="ExecuTorch-W4A8"),
    "W4A4KV4": QuantConfig(weight=_w(4, clip="mse"), act=_a(4, clip=0.9),
                           kv=QuantSpec(bits=4, symmetric=False, granularity="token", dynamic=True, clip_ratio=0.95),
                           scheme="W4A4KV4"),
}


def preset(name: str) -> QuantConfig:
    if name not in SCHEMES:
        raise KeyError(f"unknown quantization scheme {name!r}; presets: {', '.join(SCHEMES)}")
    return SCHEMES[name]

