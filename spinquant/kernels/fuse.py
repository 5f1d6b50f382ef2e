"""Fuse linears that read the same input (q/k/v, gate/up) into one module computing their concatenated output.

One kernel call and one activation quantization instead of three (or two): at decode time the per-call cost, not
the arithmetic, is what these small matmuls spend. The fused module's buffers are the row-wise concatenation of the
originals' and the originals are then given views of them, so the model keeps one copy of its weights and its own
forward still works. Layouts whose buffers do not concatenate row by row (torch's int4 pack keeps groups first)
are left unfused (`fuse_linears` returns None).
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn as nn

from .linear import PackedLinear


def _return_freed_memory() -> None:
    """Give the originals' freed weights back to the OS (glibc's malloc_trim; elsewhere nothing). glibc keeps freed
    blocks below its adaptive mmap threshold in the heap, so without this a fused 1B model kept its unfused weights'
    pages: +0.57 GB of resident memory measured, and the peak grew layer by layer."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _same(values) -> bool:
    values = list(values)
    return all(v == values[0] for v in values[1:])


def _fuse_dense(mods: list[nn.Linear]) -> nn.Linear | None:
    if not _same(m.in_features for m in mods) or not _same(m.bias is None for m in mods):
        return None
    w = torch.cat([m.weight.detach() for m in mods])
    fused = nn.Linear(mods[0].in_features, w.shape[0], bias=mods[0].bias is not None, dtype=w.dtype, device=w.device)
    fused.weight = nn.Parameter(w, requires_grad=False)
    if mods[0].bias is not None:
        fused.bias = nn.Parameter(torch.cat([m.bias.detach() for m in mods]), requires_grad=False)
    start = 0
    for m in mods:  # the originals now read their rows of the fused weight: one copy in memory
        n = m.out_features
        m.weight = nn.Parameter(fused.weight.data[start:start + n], requires_grad=False)
        if m.bias is not None:
            m.bias = nn.Parameter(fused.bias.data[start:start + n], requires_grad=False)
        start += n
    _return_freed_memory()
    return fused


def _fuse_packed(mods: list[PackedLinear]) -> PackedLinear | None:
    first = mods[0]
    if not (_same(type(m) for m in mods) and _same(m.in_features for m in mods) and _same(m.w_spec for m in mods)
            and _same(m.act_spec for m in mods) and _same(m.bias is None for m in mods)):
        return None
    if any(m.input_transform is not None or m.adapter is not None for m in mods):
        return None  # an online rotation or a LoRA adapter per projection: nothing to share
    parts = [m.export_tensors() for m in mods]
    if not _same(sorted(p) for p in parts):
        return None
    t = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    fused = type(first).from_export(t, first.in_features, sum(m.out_features for m in mods), first.w_spec,
                                    first.act_spec, first.kernel)
    del parts, t
    # every buffer of the fused layout must be the originals' stacked row-wise, so they can become views of it
    names = [n for n, b in fused.named_buffers(recurse=False) if b is not None]
    if any(n not in m._buffers or m._buffers[n] is None for m in mods for n in names):
        return None
    for n in names:
        parts = [m._buffers[n] for m in mods]
        whole = fused._buffers[n]
        if whole.dim() == 0 or not _same(p.shape[1:] for p in parts + [whole]) or \
                sum(p.shape[0] for p in parts) != whole.shape[0]:
            return None
        starts = [0]
        for p in parts:
            starts.append(starts[-1] + p.shape[0])
        if not all(torch.equal(whole[a:b], p) for p, a, b in zip(parts, starts, starts[1:])):
            return None
    for n in names:
        start = 0
        for m in mods:
            rows = m._buffers[n].shape[0]
            m._buffers[n] = fused._buffers[n][start:start + rows]
            start += rows
    _return_freed_memory()
    return fused


def fuse_linears(mods: list[nn.Module]) -> nn.Module | None:
    """One module whose output [..., sum of out_features] is the concatenation of `mods`' outputs on the same input,
    or None when they cannot share one (different layouts, specs, online transforms or adapters; a layout whose
    buffers are not row-wise). On success the originals hold views of the fused module's weights."""
    if len(mods) < 2:
        return None
    if all(type(m) is nn.Linear for m in mods):
        return _fuse_dense(mods)
    if all(isinstance(m, PackedLinear) for m in mods):
        return _fuse_packed(mods)
    return None
