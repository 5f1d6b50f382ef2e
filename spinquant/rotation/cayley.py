"""SpinQuant's optimizer: SGD on the Stiefel manifold with a Cayley retraction (SGDG of Li, Fuxin & Todorovic
2020, Algorithm 2, as in the official SpinQuant `train_utils/optimizer.py`, momentum 0).

One step for a parameter P [n, n] with Euclidean gradient G, in the official code's variables:
    X  = P with unit rows                                  (about one step in 101: X ← qr_retraction(X))
    V  = −Gᵀ
    Ŵ  = V·X − ½·Xᵀ·(X·V·X),   W = Ŵ − Ŵᵀ                  (skew-symmetric)
    α  = min(lr, 1 / (‖W‖₁ + 1e-8))                         ‖·‖₁: the largest column sum of |W|
    Y  = Xᵀ + α·V,  then five times  Y = Xᵀ + α·W·(Xᵀ + Y)/2                        (retraction="iterative")
    P ← Yᵀ
The fixed-point iteration approximates the Cayley transform Y = (I − α/2·W)⁻¹ (I + α/2·W) Xᵀ; we solve that
exactly by default (retraction="exact": R stays orthogonal to float64 rounding, so rotations fused into the
weights keep the FP function exactly); the two agree to within the iteration's contraction bound (tested).
Computed in float64. Departures from the official code: float64 instead of the parameter's dtype, the exact
solve by default, and the 1-in-101 QR re-orthogonalisation drawn from a seeded generator instead of Python's
global `random` (a run is reproducible). The learning-rate schedule (cosine) lives in the training loop.
"""
from __future__ import annotations

import math

import torch

EPS = 1e-8  # the official code's epsilon in the row normalisation and the step-size cap
QR_ODDS = 101  # official: random.randint(1, 101) == 1


def unit_rows(P: torch.Tensor) -> torch.Tensor:
    """P [n, p] with each row scaled to unit norm (official `unit(p.view(n, -1))`)."""
    return P / (P.norm(dim=1, keepdim=True) + EPS)


def qr_retraction(X: torch.Tensor) -> torch.Tensor:
    """The orthonormal factor of Xᵀ with a positive R diagonal, transposed back (official `qr_retraction`)."""
    q, r = torch.linalg.qr(X.T)
    return (q * torch.sign(torch.diagonal(r))).T


def skew_generator(X: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """W [n, n] (skew-symmetric) from the unit-row parameter X and its gradient G, official SGDG lines."""
    V = -G.T
    MX = V @ X
    W_hat = MX - 0.5 * (X.T @ (X @ MX))
    return W_hat - W_hat.T


def step_size(W: torch.Tensor, lr: float) -> float:
    """α = min(lr, 1/‖W‖₁): the official cap that keeps the fixed-point retraction a contraction."""
    return min(lr, 1.0 / (W.abs().sum(dim=0).max().item() + EPS))


def cayley_retraction(X: torch.Tensor, W: torch.Tensor, V: torch.Tensor, alpha: float,
                      retraction: str = "exact", iters: int = 5) -> torch.Tensor:
    """The new parameter (Yᵀ) for unit-row X [n, n], skew W, V = −Gᵀ and step α. "exact": the Cayley transform
    Y = (I − α/2·W)⁻¹ (I + α/2·W) Xᵀ; "iterative": official `Cayley_loop`, Y = Xᵀ + α·V, then `iters` times
    Y = Xᵀ + α·W·(Xᵀ + Y)/2, a contraction towards the same Y (factor α‖W‖/2 ≤ ½ under the step cap)."""
    Xt = X.T
    if retraction == "iterative":
        Y = Xt + alpha * V
        for _ in range(iters):
            Y = Xt + alpha * (W @ (0.5 * (Xt + Y)))
        return Y.T
    if retraction != "exact":
        raise ValueError(f"retraction must be 'exact' or 'iterative', got {retraction!r}")
    eye = torch.eye(X.shape[0], dtype=X.dtype, device=X.device)
    return torch.linalg.solve(eye - 0.5 * alpha * W, (eye + 0.5 * alpha * W) @ Xt).T


class CayleySGD(torch.optim.Optimizer):
    """SGDG (see module docstring) for square orthogonal parameters. `last_alpha` holds the step actually taken
    for each parameter in the last `step()` (the capped one), for logging."""

    def __init__(self, params, lr: float = 1.5, retraction: str = "exact", seed: int = 0):
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if retraction not in ("exact", "iterative"):
            raise ValueError(f"retraction must be 'exact' or 'iterative', got {retraction!r}")
        super().__init__(params, {"lr": lr, "retraction": retraction})
        self._qr_draws = torch.Generator().manual_seed(seed)
        self.last_alpha: list[float] = []

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.last_alpha = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.ndim != 2 or p.shape[0] != p.shape[1]:
                    raise ValueError(f"CayleySGD needs square orthogonal parameters, got shape {tuple(p.shape)}")
                X = unit_rows(p.double())
                if int(torch.randint(1, QR_ODDS + 1, (1,), generator=self._qr_draws)) == 1:
                    X = qr_retraction(X)
                G = p.grad.double()
                W = skew_generator(X, G)
                alpha = step_size(W, group["lr"])
                p.copy_(cayley_retraction(X, W, -G.T, alpha, group["retraction"]).to(p.dtype))
                self.last_alpha.append(alpha)
        return loss


def cosine_lr(lr: float, step: int, steps: int) -> float:
    """Learning rate at 0-based `step` of `steps` under transformers' cosine schedule without warm-up (the
    official run script's `--lr_scheduler_type cosine`): lr · ½(1 + cos(π · step / steps))."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * step / max(1, steps)))


def orthogonality_error(R: torch.Tensor) -> float:
    """‖RᵀR − I‖_max."""
    R = R.double()
    return (R.T @ R - torch.eye(R.shape[0], dtype=torch.float64, device=R.device)).abs().max().item()
