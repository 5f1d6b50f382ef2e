"""Rotations: `none`, `quarot` (random Hadamard R1/R2 + online R3/R4), `spinquant` (learned R1/R2)."""
from __future__ import annotations

from .quarot import quarot
from .spinquant import spinquant

ROTATIONS = {"none": lambda model, cfg, calib=None, target=None: model,
             "quarot": lambda model, cfg, calib=None, target=None: quarot(model, cfg, calib),
             "spinquant": spinquant}


def apply(model, cfg, calib=None, target=None):
    """Apply the rotation named by cfg['name'] to `model` in place (exact in full precision).
    calib: token ids for learned rotations; target: the QuantConfig that will follow (SpinQuant trains
    against it when train_quant is 'auto')."""
    name = cfg.get("name", "none")
    if name not in ROTATIONS:
        raise ValueError(f"unknown rotation {name!r}; available: {', '.join(ROTATIONS)}")
    return ROTATIONS[name](model, cfg, calib, target)
