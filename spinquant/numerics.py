"""Guards against computing on garbage: non-finite weights are refused before they are rotated or quantized, and a
non-finite activation met during calibration, evaluation or decode is reported once, with the module where it first
appeared, instead of flowing into a NaN metric.

    check_finite_weights(model, "quantization")      # NonFiniteError naming the tensors, before any work
    where = first_nonfinite_module(model, lambda: model(x))   # "model.layers.3.mlp.down_proj" or None
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn


class NonFiniteError(FloatingPointError):
    """NaN or Inf where a finite number is needed; the message names the tensor or module."""


def nonfinite_tensors(model: nn.Module) -> list[str]:
    """Names of the model's floating-point parameters and buffers holding NaN or Inf."""
    bad = []
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all()):
            bad.append(name)
    return bad


def check_finite_weights(model: nn.Module, before: str) -> None:
    """Refuse a model with NaN / Inf weights before `before` (e.g. "quantization") starts, naming the tensors."""
    bad = nonfinite_tensors(model)
    if bad:
        raise NonFiniteError(f"model weights hold NaN or Inf values in {', '.join(bad[:5])}"
                             f"{f' (and {len(bad) - 5} more)' if len(bad) > 5 else ''}; refusing {before}: "
                             f"the checkpoint is corrupt or a previous step diverged")


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return getattr(out, "logits", None)


def first_nonfinite_module(model: nn.Module, run: Callable[[], object]) -> str | None:
    """Run `run()` (a forward of `model`) with hooks on every submodule; the name of the first module (in order of
    completion, so the innermost) whose output holds NaN or Inf, or None if none does."""
    found: list[str] = []
    hooks = []
    for name, m in model.named_modules():
        if not name:
            continue

        def hook(mod, inp, out, name=name):
            t = _first_tensor(out)
            if not found and t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                found.append(name)
        hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            run()
    except Exception:  # noqa: BLE001 - we are only locating; the caller reports the original problem
        pass
    finally:
        for h in hooks:
            h.remove()
    return found[0] if found else None


def nonfinite_activation_error(model: nn.Module, run: Callable[[], object], during: str) -> NonFiniteError:
    """The error to raise when `run()` produced NaN / Inf: names the weights that hold them, else the module whose
    output first did."""
    bad = nonfinite_tensors(model)
    if bad:
        return NonFiniteError(f"non-finite results during {during}: model weights hold NaN or Inf values in "
                              f"{', '.join(bad[:5])}{f' (and {len(bad) - 5} more)' if len(bad) > 5 else ''}")
    where = first_nonfinite_module(model, run)
    at = f"first in the output of {where}" if where else "(no single module's output shows it)"
    return NonFiniteError(f"non-finite activations (NaN or Inf) during {during}, {at}; the weights are finite, so "
                          f"the values overflow: check the model's dtype (float16 overflows above 65504) and scales")
