"""Exact rotations of a Llama-family model (QuaRot / SpinQuant R1–R4), fused in float64.

Conventions: activations are row vectors, a linear computes y = x Wᵀ + b with W [out, in].
- fuse_norms: RMSNorm weights γ are folded into the linears that read the normed stream
  (W ← W·diag(γ)), then γ = 1, so that an orthogonal R1 commutes with the norm.
- R1 [hidden, hidden]: residual h → h R1. Readers (q, k, v, gate, up, lm_head): W ← W R1.
  Writers (o, down, embedding rows): W ← R1ᵀ W (embedding E ← E R1), bias b ← b R1.
  Tied embeddings are untied first (the final norm folds into lm_head only).
- R2 [head_dim, head_dim] per layer: each V head's output v_h → v_h R2 (W_v rows of a head ← R2ᵀ W_v,h),
  o_proj's columns of each head ← W_o[:, h] R2. Same R2 for every head, so GQA groups stay consistent.
- R3: online Hadamard on queries and keys after RoPE (q Hᵀ... cancels in q kᵀ): `attn.qk_transform`.
- R4: online Hadamard on down_proj's input; its inverse is fused into down_proj (W ← W H, H orthogonal).
In full precision each step leaves the model's function unchanged: every formula runs in float64 (a float64 model
is rotated float64 end to end, tested to 1e-12 relative with float64 RMSNorms; transformers' own RMSNorm computes
in float32 whatever the model's dtype, which alone bounds a float64 model at ~1e-7).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..models.adapter import get_adapter
from ..models.attention import use_spinquant_attention
from ..quant.linear import QuantLinear
from .online import OnlineHadamard


def _update(mod: nn.Module, name: str, fn) -> None:
    """mod.<name> ← fn(mod.<name> in float64), cast back to its dtype."""
    p = getattr(mod, name)
    if p is None:
        return
    p.data = fn(p.data.double()).to(p.dtype)


# ---- the rotation formulas, as pure functions (used in place here and functionally by SpinQuant) ----

def rotate_reader(W: torch.Tensor, R1: torch.Tensor) -> torch.Tensor:
    """A linear reading the residual stream (or the embedding table): W ← W R1."""
    return W @ R1


def rotate_writer(W: torch.Tensor, R1: torch.Tensor) -> torch.Tensor:
    """A linear writing to the residual stream: W ← R1ᵀ W (its bias: `rotate_reader(b, R1)`)."""
    return R1.T @ W


def rotate_v_heads(W: torch.Tensor, R2: torch.Tensor, head_dim: int) -> torch.Tensor:
    """v_proj weight [kv_heads·hd, in]: each head's rows ← R2ᵀ W_h."""
    return (R2.T @ W.reshape(-1, head_dim, W.shape[1])).reshape(W.shape)


def rotate_v_bias(b: torch.Tensor, R2: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (b.reshape(-1, head_dim) @ R2).reshape(-1)


def rotate_o_heads(W: torch.Tensor, R2: torch.Tensor, head_dim: int) -> torch.Tensor:
    """o_proj weight [out, heads·hd]: each head's columns ← W_h R2."""
    return (W.reshape(W.shape[0], -1, head_dim) @ R2).reshape(W.shape)


def untie_embeddings(model) -> None:
    a = get_adapter(model)
    if a.tied_embeddings(model):
        head = a.head(model)
        head.weight = nn.Parameter(head.weight.data.clone(), requires_grad=head.weight.requires_grad)
        model.config.tie_word_embeddings = False


@torch.no_grad()
def fuse_norms(model) -> None:
    """Fold every RMSNorm weight into the linears reading its output; the norms become weight-1."""
    a = get_adapter(model)
    untie_embeddings(model)

    def fold(norm, linears):
        g = norm.weight.data.double()
        for lin in linears:
            _update(lin, "weight", lambda W: W * g)
        norm.weight.data.fill_(1.0)

    for layer in a.decoder_layers(model):
        lins = a.layer_linears(layer)
        fold(layer.get_submodule(a.input_norm), [lins["q"], lins["k"], lins["v"]])
        fold(layer.get_submodule(a.post_attn_norm), [lins["gate"], lins["up"]])
    fold(a.norm(model), [a.head(model)])


@torch.no_grad()
def rotate_residual(model, R1: torch.Tensor) -> None:
    """Apply R1 [hidden, hidden] (orthogonal) to the residual stream; requires fuse_norms first."""
    a = get_adapter(model)
    R = R1.double()
    _update(a.embedding(model), "weight", lambda E: rotate_reader(E, R))
    for layer in a.decoder_layers(model):
        lins = a.layer_linears(layer)
        for role in ("q", "k", "v", "gate", "up"):
            _update(lins[role], "weight", lambda W: rotate_reader(W, R))
        for role in ("o", "down"):
            _update(lins[role], "weight", lambda W: rotate_writer(W, R))
            _update(lins[role], "bias", lambda b: rotate_reader(b, R))
    _update(a.head(model), "weight", lambda W: rotate_reader(W, R))


@torch.no_grad()
def rotate_heads(model, R2s: list[torch.Tensor]) -> None:
    """Apply R2 [head_dim, head_dim] (one per layer) to each V head's output and o_proj's input."""
    a = get_adapter(model)
    hd = a.head_dim(model)
    for layer, R2 in zip(a.decoder_layers(model), R2s):
        R = R2.double()
        lins = a.layer_linears(layer)
        v, o = lins["v"], lins["o"]
        _update(v, "weight", lambda W: rotate_v_heads(W, R, hd))
        _update(v, "bias", lambda b: rotate_v_bias(b, R, hd))
        _update(o, "weight", lambda W: rotate_o_heads(W, R, hd))


def add_qk_hadamard(model, fallback: str = "error") -> None:
    """R3: an online Hadamard over head_dim on queries and keys, after RoPE (exact: it cancels in q·kᵀ)."""
    a = get_adapter(model)
    use_spinquant_attention(model)
    for layer in a.decoder_layers(model):
        a.attention(layer).qk_transform = OnlineHadamard(a.head_dim(model), fallback)


@torch.no_grad()
def add_down_hadamard(model, fallback: str = "error") -> None:
    """R4: online Hadamard on down_proj's input x → x H, with W_down ← W_down H fused (H orthogonal)."""
    a = get_adapter(model)
    for layer in a.decoder_layers(model):
        path = a.down
        lin = layer.get_submodule(path)
        had = OnlineHadamard(lin.in_features, fallback)
        H = had.matrix(torch.float64)
        ql = lin if isinstance(lin, QuantLinear) else QuantLinear.from_linear(lin, None)
        if ql.qweight is not None:
            raise ValueError("rotate before quantizing: down_proj is already quantized")
        _update(ql, "weight", lambda W: W @ H)
        ql.input_transform = had
        head, _, leaf = path.rpartition(".")
        setattr(layer.get_submodule(head), leaf, ql)


def check_sizes(model, fallback: str = "error") -> None:
    """Raise (naming the size) before anything is modified if hidden, head_dim or the MLP width has no
    Hadamard under `fallback`."""
    a = get_adapter(model)
    inter = a.layer_linears(a.decoder_layers(model)[0])["down"].in_features
    for n in (model.config.hidden_size, a.head_dim(model), inter):
        OnlineHadamard(n, fallback)


def rotate_model(model, R1: torch.Tensor, R2s: list[torch.Tensor], fallback: str = "error", r3: bool = True,
                 r4: bool = True) -> None:
    """The full sequence: fold norms, R1, R2 per layer, then the online R3 (Q/K) and R4 (down_proj)."""
    fuse_norms(model)
    rotate_residual(model, R1)
    rotate_heads(model, R2s)
    if r3:
        add_qk_hadamard(model, fallback)
    if r4:
        add_down_hadamard(model, fallback)
