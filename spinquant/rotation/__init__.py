"""Rotations by name: `none`, `quarot` (random Hadamard R1/R2 + online R3/R4), `spinquant` (learned R1/R2),
plus any registered with `register_rotation`. Each has a typed config (unknown keys are refused) and records a
`RotationState` on the model it rotates."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Callable

from ..models.state import state_of
from ..typed import from_fields
from .quarot import quarot
from .spinquant import learn_rotations


@dataclass
class NoRotation:
    name: str = "none"


@dataclass
class QuaRotConfig:
    """QuaRot (Ashkboos et al. 2024): random orthogonal Hadamard R1 / R2 fused, online Hadamard R3 (Q/K) and R4."""
    name: str = "quarot"
    seed: int | None = None  # None: the run's seed (RunConfig.seed); 0 when rotating outside a run
    fallback: str = "error"  # error | block_diagonal (sizes with no Hadamard construction)
    r3: bool = True
    r4: bool = True


@dataclass
class SpinQuantConfig:
    """SpinQuant (Liu et al. 2024): R1 / R2 learned by Cayley SGD; defaults are the official recipe
    (configs/rotation/spinquant.yaml documents each key and the stated departures)."""
    name: str = "spinquant"
    seed: int | None = None  # None: the run's seed (RunConfig.seed); 0 when rotating outside a run
    steps: int = 100
    lr: float = 1.5
    schedule: str = "cosine"
    batch_size: int = 8
    micro_batch_size: int = 1
    max_grad_norm: float | None = 1.0
    retraction: str = "exact"
    samples: int = 800
    heldout: int = 8
    seq_len: int | None = None  # None: the run's model.seq_len (as Hydra's ${model.seq_len})
    fallback: str = "error"
    r3: bool = True
    r4: bool = True
    train_quant: object = "auto"
    load: str | None = None
    save: str | None = None
    progress: bool | None = None  # None: the run's progress (shown outside a run)


@dataclass
class RotationState:
    """What rotated a model, recorded once on it (`model.spinquant.rotation`), saved and reloaded with it."""
    name: str
    config: dict
    stats: dict = field(default_factory=dict)  # learned rotations: training statistics (losses, held-back loss, ...)

    def to_dict(self) -> dict:
        return {"name": self.name, "config": dict(self.config),
                "stats": {k: v for k, v in self.stats.items() if k != "losses"}}


@dataclass(frozen=True)
class Rotation:
    name: str
    config: type
    fn: Callable  # fn(model, config dict, calib, target) -> stats dict or None
    summary: str


ROTATIONS: dict[str, Rotation] = {}


def register_rotation(name: str, config: type, fn: Callable, summary: str = "") -> Rotation:
    """Register a rotation: `config` a dataclass with a `name` field (its fields are the accepted keys), `fn(model,
    cfg: dict, calib, target)` rotating the model in place and returning its statistics (or None)."""
    if "name" not in {f.name for f in fields(config)}:
        raise TypeError(f"rotation config {config.__name__} needs a `name` field")
    ROTATIONS[name] = Rotation(name, config, fn, summary or (config.__doc__ or "").strip().split("\n")[0])
    return ROTATIONS[name]


register_rotation("none", NoRotation, lambda model, cfg, calib=None, target=None: None, "no rotation")
def _quarot(model, cfg: dict, calib=None, target=None) -> None:
    quarot(model, cfg)


register_rotation("quarot", QuaRotConfig, _quarot)
register_rotation("spinquant", SpinQuantConfig, learn_rotations)


def rotation_config(cfg) -> object:
    """A typed rotation config from a dict (a Hydra `rotation` group) or an instance; unknown keys are refused."""
    if not isinstance(cfg, dict) and hasattr(cfg, "name") and type(cfg) in {r.config for r in ROTATIONS.values()}:
        return cfg
    d = {"name": cfg} if isinstance(cfg, str) else dict(cfg or {})
    name = d.get("name", "none")
    if name not in ROTATIONS:
        raise ValueError(f"unknown rotation {name!r}; available: {', '.join(ROTATIONS)}")
    return from_fields(ROTATIONS[name].config, d, "rotation", f" for rotation {name!r}")


def apply(model, cfg, calib=None, target=None):
    """Rotate `model` in place (exact in full precision) by the typed config or dict `cfg`, and record a
    `RotationState` on it. calib: token ids for learned rotations; target: the QuantConfig that will follow
    (SpinQuant trains against it when train_quant is 'auto')."""
    typed = rotation_config(cfg)
    done = state_of(model).rotation
    if done is not None and done.name != "none":
        raise ValueError(f"model is already rotated ({done.name}); rotations are fused into the weights and a second "
                         f"one would be applied on top of the first (and leave the online R3/R4 of the first "
                         f"wrong): rotate a fresh FP model instead")
    if state_of(model).quant is not None:
        raise ValueError(f"model is already quantized ({state_of(model).quant.label()}); rotate the FP model first, "
                         f"then quantize_ it")
    if typed.name != "none":
        from ..numerics import check_finite_weights
        check_finite_weights(model, f"rotation {typed.name!r}")
    d = asdict(typed)
    if "seed" in d and d["seed"] is None:  # outside a run there is no run seed to inherit: the documented default
        d["seed"] = 0
    stats = ROTATIONS[typed.name].fn(model, d, calib, target) or {}
    state_of(model).rotation = RotationState(typed.name, d, stats)
    return model


rotate = apply

__all__ = ["NoRotation", "QuaRotConfig", "ROTATIONS", "Rotation", "RotationState", "SpinQuantConfig", "apply",
           "learn_rotations", "quarot", "register_rotation", "rotate", "rotation_config"]
