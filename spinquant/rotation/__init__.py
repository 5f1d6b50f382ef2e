"""Rotations: `none`, `quarot` (random Hadamard R1/R2 + online R3/R4), `spinquant` (learned R1/R2)."""
from __future__ import annotations

from .quarot import quarot
from .spinquant import spinquant

ROTATIONS = {"none": lambda model, cfg, calib=None: model, "quarot": quarot, "spinquant": spinquant}


def apply(model, cfg, calib=None):
    """Apply the rotation named by cfg['name'] to `model` in place (exact in full precision)."""
    name = cfg.get("name", "none")
    if name not in ROTATIONS:
        raise ValueError(f"unknown rotation {name!r}; available: {', '.join(ROTATIONS)}")
    return ROTATIONS[name](model, cfg, calib)
