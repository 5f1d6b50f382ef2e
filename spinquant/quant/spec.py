"""`QuantSpec`: how one tensor is quantized (bits, symmetry, granularity, clipping)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

GRANULARITIES = ("tensor", "channel", "group", "token")
SCALE_DTYPES = (None, "float16", "bfloat16")


@dataclass(frozen=True)
class QuantSpec:
    """Uniform integer quantization of a tensor along its last dimension.

    granularity: `tensor` (one scale), `channel` (one per row of a weight [out, in], i.e. per output
    channel), `token` (one per row of an activation [..., features]: the same reduction as `channel`),
    or `group` (rows split into contiguous groups of `group_size` along the last dimension).
    bits 16 means "not quantized". `clip_ratio` shrinks the range; `clip_search="mse"` searches a
    per-row ratio minimising the quantization error. `dynamic`: parameters computed on the fly from each
    input (activations); static ones are computed once (weights).
    """

    bits: int = 16
    symmetric: bool = True
    granularity: str = "channel"
    group_size: int | None = None
    dynamic: bool = False
    clip_ratio: float = 1.0
    clip_search: str = "none"  # "none" | "mse"
    # scales rounded to what a runtime stores: "float16" (GGUF's Q4_0 / Q8_0 blocks), "bfloat16" (XNNPACK's grouped int4)
    scale_dtype: str | None = None

    def __post_init__(self):
        if not isinstance(self.bits, int) or not (2 <= self.bits <= 8 or self.bits == 16):
            raise ValueError(f"QuantSpec.bits must be an integer in 2..8 (or 16 for no quantization), got {self.bits!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"QuantSpec.granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise ValueError(f"granularity 'group' needs a positive integer group_size, got {self.group_size!r}")
        elif self.group_size is not None:
            raise ValueError(f"group_size={self.group_size} given with granularity {self.granularity!r}; "
                             f"use granularity='group'")
        if not 0.0 < self.clip_ratio <= 1.0:
            raise ValueError(f"QuantSpec.clip_ratio must be in (0, 1], got {self.clip_ratio}")
        if self.clip_search not in ("none", "mse"):
            raise ValueError(f"QuantSpec.clip_search must be 'none' or 'mse', got {self.clip_search!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"QuantSpec.scale_dtype must be one of {SCALE_DTYPES}, got {self.scale_dtype!r}")

    @property
    def enabled(self) -> bool:
        return self.bits < 16

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def check_shape(self, last_dim: int, what: str = "tensor") -> None:
        """Raise if this spec cannot quantize a tensor whose last dimension is `last_dim`."""
        if self.enabled and self.granularity == "group" and last_dim % self.group_size:
            raise ValueError(f"group_size {self.group_size} does not divide the last dimension {last_dim} of {what}; "
                             f"pick a group size that divides {last_dim}")

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["scale_dtype"] is None:  # rows and saved models written before the field existed stay the same
            del d["scale_dtype"]
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> "QuantSpec":
        if d is None:
            return cls()
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown QuantSpec field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**dict(d))

    def short(self) -> str:
        """Compact label, e.g. 'int4 sym g32' or 'fp16'."""
        if not self.enabled:
            return "fp16"
        g = {"group": f"g{self.group_size}", "channel": "per-ch", "token": "per-tok", "tensor": "per-tensor"}
        return f"int{self.bits} {'sym' if self.symmetric else 'asym'} {g[self.granularity]}"
