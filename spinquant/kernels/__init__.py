"""Real low-bit execution: `pack(model)` swaps the fake-quant modules for packed ones (in place).

The fake-quant path decides accuracy; the packed path reproduces it (to bf16 rounding, tested) and is
what size, memory and speed are measured on.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from ..models.state import state_of
from ..quant.apply import set_module
from ..quant.linear import QuantEmbedding, QuantLinear
from . import layouts  # noqa: F401  (registers the packed layouts)
from .kv_cache import PackedKVLayer, cache_nbytes, packed_kv_cache
from .linear import KERNELS, LAYOUTS, PackedEmbedding, PackedLinear, choose_kernel, layout, register_layout, token_codes

__all__ = ["KERNELS", "LAYOUTS", "PackedEmbedding", "PackedKVLayer", "PackedLinear", "cache_nbytes", "choose_kernel",
           "kernel_summary", "layout", "pack", "packed_kv_cache", "register_layout", "token_codes"]


def pack(model: nn.Module, dtype: torch.dtype = torch.bfloat16, progress: bool = False, backend: str = "cpu") -> nn.Module:
    """Quantized model (after `quantize_` or `qat.convert`) -> packed model computing in `dtype` (in place).
    backend "cpu": torch's CPU low-bit ops (the model must be on the CPU); "triton": the Triton kernels for
    int4 weights and W8A8 (a GPU model, or a CPU one under TRITON_INTERPRET=1), dequant for the rest.

    QuantLinear with integer weights -> PackedLinear, QuantEmbedding -> PackedEmbedding; everything else
    (norms, 16-bit linears, an unquantized embedding) is cast to `dtype`. An int8 lm_head and embedding
    holding the same codes (a tied model at 8 bit) share one table.
    """
    if not any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules()):
        raise ValueError("pack() needs a quantized model: run spinquant.quant.quantize_ (or qat.convert) first")
    devices = {p.device.type for p in model.parameters()}
    if backend == "cpu" and devices != {"cpu"}:
        raise ValueError(f"pack(backend='cpu') builds CPU kernels; the model is on {sorted(devices)}: move it to the "
                         f"CPU, or pack it for the GPU with backend='triton'")
    if backend == "triton" and devices != {"cuda"} and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"pack(backend='triton') needs the model on a GPU (it is on {sorted(devices)}), or "
                         f"TRITON_INTERPRET=1 to run the kernels on the CPU")
    for p in model.parameters():  # parameters only: buffers such as RoPE's inv_freq stay float32
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))]
    from tqdm.auto import tqdm
    for name, m in tqdm(targets, desc="pack", disable=not progress):
        if isinstance(m, QuantEmbedding):
            set_module(model, name, PackedEmbedding.from_quant_embedding(m, dtype))
        elif m.qweight is not None:
            set_module(model, name, PackedLinear.from_quant_linear(m, backend=backend))
    share_tied_table(model)
    state_of(model).packed_dtype = dtype
    return model


def share_tied_table(model: nn.Module) -> bool:
    """Let an int8 embedding use the lm_head's int8 table when both hold the same codes and scales."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    table = head.int8_table() if isinstance(head, PackedLinear) else None
    if not isinstance(emb, PackedEmbedding) or table is None:
        return False
    if emb.zero is not None or head.k_pad != head.in_features or emb.codes.shape != table.shape:
        return False
    if torch.equal(emb.codes, table) and torch.equal(emb.scale[:, 0], head.w_scale):
        emb.codes = table
        return True
    return False


def kernel_summary(model: nn.Module) -> dict[str, int]:
    """How many linears run on each kernel, e.g. {'int4': 112, 'int8': 1}."""
    out: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, PackedLinear):
            out[m.kernel] = out.get(m.kernel, 0) + 1
    return out
