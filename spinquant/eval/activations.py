"""Activation statistics of the inputs to each linear role (do outlier channels exist? then rotation helps).

For an input X [tokens, channels]: `kurtosis` is the Pearson kurtosis E[(x-μ)^4]/σ^4 of all its values
(3 for a Gaussian, large with outliers); `channel_max_ratio` is max_c max_t |X| / median_c max_t |X|
(how far the largest channel sticks out); `top_channels` the three channels with the largest max |x|.
q/k/v share one input (after input_layernorm), as do gate/up (after post_attention_layernorm).
"""
from __future__ import annotations

import torch

from ..models.adapter import get_adapter

INPUT_ROLES = {"qkv": "q", "o": "o", "gate_up": "gate", "down": "down"}


def pearson_kurtosis(x: torch.Tensor) -> float:
    x = x.double().reshape(-1)
    c = x - x.mean()
    return (c.pow(4).mean() / c.pow(2).mean().pow(2)).item()


def summarize(x: torch.Tensor) -> dict:
    """Statistics of one input X [..., channels]."""
    x = x.reshape(-1, x.shape[-1]).double()
    ch_max = x.abs().amax(0)
    return {"kurtosis": pearson_kurtosis(x), "abs_max": ch_max.max().item(),
            "channel_max_ratio": (ch_max.max() / ch_max.median().clamp(min=1e-12)).item(),
            "top_channels": ch_max.topk(min(3, ch_max.numel())).indices.tolist()}


@torch.no_grad()
def activation_stats(model, ids: torch.Tensor, batch_size: int = 4) -> list[dict]:
    """One dict per (layer, input role) with `summarize` of that input over the calibration ids [n, seq]."""
    adapter = get_adapter(model)
    store: dict[tuple[int, str], list] = {}
    hooks = []
    for li, layer in enumerate(adapter.decoder_layers(model)):
        lins = adapter.layer_linears(layer)
        for name, role in INPUT_ROLES.items():
            hooks.append(lins[role].register_forward_hook(
                lambda m, inp, out, key=(li, name): store.setdefault(key, []).append(inp[0].detach().float())))
    try:
        for i in range(0, ids.shape[0], batch_size):
            model(ids[i: i + batch_size], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [{"layer": li, "input": name, **summarize(torch.cat(v))} for (li, name), v in sorted(store.items())]
