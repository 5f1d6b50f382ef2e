"""`QuantConfig` (what to quantize, how) and the named scheme presets."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from .spec import QuantSpec

FP = QuantSpec()
SPEC_FIELDS = ("weight", "act", "kv", "embed", "lm_head", "lm_head_act")


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
    group_fallback: str = "error"  # "error" | "channel": layers whose width a group does not divide
    # calibrated quantizers (GPTQ): calibrate each layer on the quantized model's activations (act / KV quantization
    # on in the layers already done, Hessian of the quantized input), as llm-compressor and GPTQModel do
    calib_act_quant: bool = False

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
        if self.group_fallback not in ("error", "channel"):
            raise ValueError(f"group_fallback must be 'error' or 'channel', got {self.group_fallback!r}")

    def weight_spec_for(self, in_features: int, what: str = "weight") -> QuantSpec:
        """The weight spec for a linear with `in_features` inputs (per-channel fallback if allowed)."""
        w = self.weight
        if w.enabled and w.granularity == "group" and in_features % w.group_size:
            if self.group_fallback == "channel":
                return replace(w, granularity="channel", group_size=None)
            w.check_shape(in_features, what + " (set quant.group_fallback=channel to use per-channel there)")
        return w

    def label(self) -> str:
        """`W{w}A{a}` plus `KV{kv}` when the KV cache is quantized."""
        s = f"W{self.weight.bits}A{self.act.bits}"
        return s + (f"KV{self.kv.bits}" if self.kv.enabled else "")

    def to_dict(self) -> dict:
        d = {k: getattr(self, k).to_dict() for k in SPEC_FIELDS}
        return {**d, "method": self.method, "method_options": dict(self.method_options), "scheme": self.scheme,
                "group_fallback": self.group_fallback, "calib_act_quant": self.calib_act_quant}

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
        if d:
            raise ValueError(f"unknown quant config key(s) {sorted(d)}; known: scheme, method, method_options, "
                             f"group_fallback, calib_act_quant, weight, act, kv, embed, lm_head, lm_head_act")
        return replace(base, **kw)


def _w(bits, group=None, sym=True, clip="none"):
    return QuantSpec(bits=bits, symmetric=sym, granularity="group" if group else "channel", group_size=group,
                     clip_search=clip)


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
    "W4A4KV4": QuantConfig(weight=_w(4, clip="mse"), act=_a(4, clip=0.9),
                           kv=QuantSpec(bits=4, symmetric=False, granularity="token", dynamic=True, clip_ratio=0.95),
                           scheme="W4A4KV4"),
}


def preset(name: str) -> QuantConfig:
    if name not in SCHEMES:
        raise KeyError(f"unknown quantization scheme {name!r}; presets: {', '.join(SCHEMES)}")
    return SCHEMES[name]

