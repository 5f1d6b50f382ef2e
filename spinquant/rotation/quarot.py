"""QuaRot: random Hadamard R1 (residual) and R2 (per head), online Hadamards R3 (Q/K) and R4 (down_proj)."""
from __future__ import annotations

from ..models.adapter import get_adapter
from .fuse import check_sizes, rotate_model
from .online import random_orthogonal_hadamard


def quarot(model, cfg: dict, calib=None):
    """Rotate `model` in place. cfg keys: seed, fallback ('error' | 'block_diagonal'), r3, r4 (bools)."""
    a = get_adapter(model)
    seed, fallback = int(cfg.get("seed", 0)), cfg.get("fallback", "error")
    check_sizes(model, fallback)  # every size checked before the model is touched
    R1 = random_orthogonal_hadamard(model.config.hidden_size, seed, fallback)
    R2s = [random_orthogonal_hadamard(a.head_dim(model), seed + 1 + i, fallback)
           for i in range(len(a.decoder_layers(model)))]
    rotate_model(model, R1, R2s, fallback, cfg.get("r3", True), cfg.get("r4", True))
    return model
