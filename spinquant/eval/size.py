"""Model size: bits actually stored (codes at their bit-width + 16-bit scales + zero points) and on disk.

Accounting: a quantized tensor stores `bits` per weight, one fp16 scale per group, and for asymmetric
specs one `bits`-wide integer zero point per group (an fp16 one when a quantizer produced fractional zero
points: HQQ, merged QA-LoRA); everything unquantized is counted at 16 bits (the
BF16 baseline). Tied embeddings are counted once. `size_on_disk` writes exactly those tensors (codes
bit-packed, scales fp16, the rest bf16) to a safetensors file and returns its byte count.
"""
from __future__ import annotations

import os
import tempfile

import torch

from ..kernels.packing import pack_bits
from ..quant.linear import QuantEmbedding, QuantLinear


def _quantized_modules(model):
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)) and getattr(m, "qweight", None) is not None:
            yield name, m


def _unique_params(model, skip: set[int]):
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.data_ptr() in seen or id(p) in skip:
            continue
        seen.add(p.data_ptr())
        yield name, p


def _zero_bits(qw) -> int:
    """Bits per stored zero point: none (symmetric), `bits` (integer zeros) or 16 (fractional zeros)."""
    if qw.spec.symmetric:
        return 0
    return qw.spec.bits if torch.equal(qw.zero, qw.zero.round()) else 16


def size_bits(model) -> dict:
    """{'total_bits', 'quantized_bits', 'fp16_bits'}: stored size under the accounting above."""
    qbits, skip = 0, set()
    for _, m in _quantized_modules(model):
        qw = m.qweight
        n_groups = qw.scale.numel()
        qbits += qw.codes.numel() * qw.spec.bits + n_groups * 16 + n_groups * _zero_bits(qw)
        skip.add(id(m.weight))
    fp_bits = sum(p.numel() * 16 for _, p in _unique_params(model, skip))
    return {"total_bits": qbits + fp_bits, "quantized_bits": qbits, "fp16_bits": fp_bits}


def fp16_size_bits(model) -> int:
    """Size of the same model with every parameter at 16 bits (the BF16 reference)."""
    return sum(p.numel() * 16 for _, p in _unique_params(model, set()))


def packed_state_dict(model) -> dict[str, torch.Tensor]:
    """Tensors as they would be stored: bit-packed codes, fp16 scales, packed zeros, bf16 for the rest."""
    from ..quant.spec import QuantSpec  # noqa: F401
    out, skip = {}, set()
    for name, m in _quantized_modules(model):
        qw, spec = m.qweight, m.qweight.spec
        out[f"{name}.qcodes"] = pack_bits(qw.codes, spec.bits, offset=-spec.qmin)
        out[f"{name}.qscale"] = qw.scale.to(torch.float16).contiguous()
        if _zero_bits(qw) == 16:
            out[f"{name}.qzero"] = qw.zero.to(torch.float16).contiguous()
        elif not spec.symmetric:
            out[f"{name}.qzero"] = pack_bits(qw.zero.round().to(torch.int32), spec.bits)
        skip.add(id(m.weight))
    for name, p in _unique_params(model, skip):
        out[name] = p.detach().to(torch.bfloat16).contiguous()
    return out


def size_on_disk(model) -> int:
    """Bytes of a safetensors file holding `packed_state_dict(model)`."""
    from safetensors.torch import save_file
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.safetensors")
        save_file(packed_state_dict(model), path)
        return os.path.getsize(path)
