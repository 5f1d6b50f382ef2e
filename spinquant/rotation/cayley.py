"""Cayley SGD on the orthogonal group (SpinQuant's optimizer for R1/R2; Li, Fuxin & Todorovic 2020).

For a parameter R [n, n] with RᵀR = I and Euclidean gradient G, the skew-symmetric A = G Rᵀ − R Gᵀ
gives the Riemannian descent direction −A R; the Cayley retraction
    R ← (I + lr/2 · A)⁻¹ (I − lr/2 · A) R
stays exactly orthogonal (the Cayley transform of a skew matrix is orthogonal). Solved in float64,
no momentum (the SpinQuant recipe).
"""
from __future__ import annotations

import torch


class CayleySGD(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1.5):
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.ndim != 2 or p.shape[0] != p.shape[1]:
                    raise ValueError(f"CayleySGD needs square orthogonal parameters, got shape {tuple(p.shape)}")
                R, G = p.double(), p.grad.double()
                A = G @ R.T - R @ G.T
                eye = torch.eye(R.shape[0], dtype=torch.float64, device=R.device)
                half = group["lr"] / 2
                p.copy_(torch.linalg.solve(eye + half * A, (eye - half * A) @ R).to(p.dtype))
        return loss


def orthogonality_error(R: torch.Tensor) -> float:
    """‖RᵀR − I‖_max."""
    R = R.double()
    return (R.T @ R - torch.eye(R.shape[0], dtype=torch.float64, device=R.device)).abs().max().item()
