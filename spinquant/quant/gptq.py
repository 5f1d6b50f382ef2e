"""GPTQ (Frantar et al. 2022): quantize columns one at a time, pushing each column's rounding error onto
the not-yet-quantized columns through the inverse Hessian of the layer's calibration inputs.

Groups stay contiguous in the original column order (so packed kernels need no g_idx): without
act-order, a group's scale/zero is computed when GPTQ reaches it, on the error-updated weights; with
act-order, every group's scale/zero is fixed up front from the original weights ("static groups").
"""
from __future__ import annotations

import torch

from .quantizer import compute_qparams
from .registry import QuantizedWeight, register_weight_quantizer
from .spec import QuantSpec


class HessianAccumulator:
    """Running H = 2/n · Σ xᵀx over calibration rows x [*, in] (float64 accumulation for stability)."""

    def __init__(self, in_features: int, name: str = "a linear"):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.n, self.name = 0, name

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        if not bool(torch.isfinite(x).all()):
            from ..numerics import NonFiniteError
            raise NonFiniteError(f"non-finite activations (NaN or Inf) entering {self.name} during GPTQ calibration: "
                                 f"the calibration forward overflows before this layer (check the model's dtype)")
        self.H += x.T @ x
        self.n += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.n == 0:
            raise RuntimeError("no calibration rows reached this layer; cannot build its GPTQ Hessian")
        return (2.0 / self.n * self.H).float()


def _inverse_hessian_cholesky(H: torch.Tensor, damp: float, dtype=torch.float32) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp·mean(diag H)·I)⁻¹, retrying with more damping if H is singular."""
    n = H.shape[0]
    mean_diag = H.diagonal().mean()
    for attempt in range(6):
        Hd = H + (damp * 10**attempt) * mean_diag * torch.eye(n, dtype=H.dtype)
        L, info = torch.linalg.cholesky_ex(Hd.double())
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                return U.to(dtype)
    raise RuntimeError("GPTQ: Hessian is not positive definite even with 1e5× damping; check calibration data")


@register_weight_quantizer("gptq", needs_hessian=True)
def gptq(weight: torch.Tensor, spec: QuantSpec, hessian: torch.Tensor | None = None, damp: float = 0.01,
         act_order: bool = True, block_size: int = 128) -> QuantizedWeight:
    """weight [out, in], hessian [in, in] -> QuantizedWeight (codes in the original column order). Computes in
    float32, or float64 when the weight is float64 (as the reference test does).

    The GPTQ update of Frantar et al. (Algorithm 1 with lazy block updates) as in the official gptq.py: columns in
    order (descending diag H with act_order), error / [H⁻¹]_ii pushed onto later columns through the upper
    Cholesky factor of (H + damp·mean(diag H)·I)⁻¹. One departure: without act_order a group's scale / zero are
    computed from its weights after every earlier column's update; the official code reads them from W as of
    the start of the current block, which makes its result depend on block_size when groups are smaller than
    blocks (the two agree when block_size == group_size). Ours is block-size invariant (tested)."""
    if hessian is None:
        raise ValueError("gptq needs a Hessian from calibration data (spinquant.quant.apply collects it)")
    out_f, in_f = weight.shape
    spec.check_shape(in_f, "weight")
    dt = torch.float64 if weight.dtype == torch.float64 else torch.float32
    W = weight.detach().to(dt).clone()
    H = hessian.detach().to(dt).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    gs = spec.group_size if spec.granularity == "group" else None
    if gs:  # align blocks to groups so each group is quantized from its updated in-block values
        block_size = gs * max(1, block_size // gs)

    # per-column (scale, zero) lookup: [out, in] views into per-group params
    if gs is None:  # channel or tensor: one set of params from the original weights
        s, z = compute_qparams(W, spec)
        col_scale = s.reshape(-1, 1).expand(out_f, in_f) if spec.granularity != "tensor" else s.reshape(1, 1).expand(out_f, in_f)
        col_zero = z.reshape(-1, 1).expand(out_f, in_f) if spec.granularity != "tensor" else z.reshape(1, 1).expand(out_f, in_f)
        col_scale, col_zero = col_scale.to(dt).clone(), col_zero.to(dt).clone()
    else:
        col_scale = torch.empty(out_f, in_f, dtype=dt)
        col_zero = torch.empty(out_f, in_f, dtype=dt)
        if act_order:  # static groups from the original weights
            s, z = compute_qparams(W, spec)  # [out, n_groups, 1]
            col_scale = s.expand(-1, -1, gs).reshape(out_f, in_f).to(dt).clone()
            col_zero = z.expand(-1, -1, gs).reshape(out_f, in_f).to(dt).clone()

    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(in_f)
    W, H = W[:, perm], H[perm][:, perm]
    col_scale, col_zero = col_scale[:, perm], col_zero[:, perm]
    Hinv = _inverse_hessian_cholesky(H, damp, dt)

    Q = torch.zeros_like(W)
    group_spec = QuantSpec(**{**spec.to_dict(), "granularity": "channel", "group_size": None})
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if gs is not None and not act_order and col % gs == 0:
                s, z = compute_qparams(W1[:, i: i + gs], group_spec)  # [out, 1, 1]
                col_scale[:, col: col + gs] = s.reshape(-1, 1)
                col_zero[:, col: col + gs] = z.reshape(-1, 1)
            w, d = W1[:, i], Hinv1[i, i]
            q = torch.clamp(torch.round(w / col_scale[:, col]) + col_zero[:, col], spec.qmin, spec.qmax)
            Q1[:, i] = q
            err = (w - (q - col_zero[:, col]) * col_scale[:, col]) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    inv = torch.argsort(perm)
    Q, col_scale, col_zero = Q[:, inv], col_scale[:, inv], col_zero[:, inv]
    codes = Q.to(torch.int8 if spec.qmax <= 127 else torch.int16)
    if spec.granularity == "group":
        scale = col_scale.reshape(out_f, in_f // gs, gs)[:, :, :1].contiguous()
        zero = col_zero.reshape(out_f, in_f // gs, gs)[:, :, :1].contiguous()
    elif spec.granularity == "tensor":
        scale, zero = col_scale[:1, :1].reshape(1, 1), col_zero[:1, :1].reshape(1, 1)
    else:
        scale, zero = col_scale[:, :1].reshape(out_f, 1, 1), col_zero[:, :1].reshape(out_f, 1, 1)
    return QuantizedWeight(codes, scale, zero, spec)
