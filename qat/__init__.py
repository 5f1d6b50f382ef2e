"""Quantization-aware training. Only `none` is available in this version; see the QAT issue."""
from __future__ import annotations

METHODS = {"none": lambda model, cfg, tokenizer=None: model}


def train(model, cfg, tokenizer=None):
    name = cfg.get("name", "none")
    if name not in METHODS:
        raise ValueError(f"unknown qat method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name](model, cfg, tokenizer)
