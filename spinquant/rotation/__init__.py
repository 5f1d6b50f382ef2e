"""Rotations (QuaRot / SpinQuant). Only `none` is available in this version; see the rotations issue."""
from __future__ import annotations

ROTATIONS = {"none": lambda model, cfg, calib=None: model}


def apply(model, cfg, calib=None):
    """Apply the rotation named by cfg['name'] to `model` in place (exact in full precision)."""
    name = cfg.get("name", "none")
    if name not in ROTATIONS:
        raise ValueError(f"unknown rotation {name!r}; available: {', '.join(ROTATIONS)}")
    return ROTATIONS[name](model, cfg, calib)
