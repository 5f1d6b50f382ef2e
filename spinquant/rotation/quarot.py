"""QuaRot: random Hadamard R1 (residual) and R2 (per head), online Hadamards R3 (Q/K) and R4 (down_proj)."""
from __future__ import annotations

from ..models.adapter import get_adapter
from .fuse import add_down_hadamard, add_qk_hadamard, fuse_norms, rotate_heads, rotate_residual
from .online import OnlineHadamard, random_orthogonal_hadamard


def quarot(model, cfg: dict, calib=None):
    """Rotate `model` in place. cfg keys: seed, fallback ('error' | 'block_diagonal'), r3, r4 (bools)."""
    a = get_adapter(model)
    seed, fallback = int(cfg.get("seed", 0)), cfg.get("fallback", "error")
    hidden, hd = model.config.hidden_size, a.head_dim(model)
    inter = a.layer_linears(a.decoder_layers(model)[0])["down"].in_features
    for n in (hidden, hd, inter):  # every size checked before the model is touched
        OnlineHadamard(n, fallback)
    fuse_norms(model)
    rotate_residual(model, random_orthogonal_hadamard(hidden, seed, fallback))
    rotate_heads(model, [random_orthogonal_hadamard(hd, seed + 1 + i, fallback)
                         for i in range(len(a.decoder_layers(model)))])
    if cfg.get("r3", True):
        add_qk_hadamard(model, fallback)
    if cfg.get("r4", True):
        add_down_hadamard(model, fallback)
    return model
