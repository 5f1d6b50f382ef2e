"""Cayley SGD keeps parameters orthogonal and solves an orthogonal Procrustes problem."""
import pytest
import torch

from spinquant.rotation.cayley import CayleySGD, orthogonality_error


def test_cayley_sgd_stays_orthogonal_and_finds_the_rotation():
    torch.manual_seed(0)
    n = 16
    target, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    if torch.det(target) < 0:  # the iterates stay in SO(n) (they start at I), so aim inside it
        target[:, 0] *= -1
    X = torch.randn(256, n, dtype=torch.float64)
    Y = X @ target
    R = torch.nn.Parameter(torch.eye(n, dtype=torch.float64))
    opt = CayleySGD([R], lr=0.5)
    losses = []
    for _ in range(300):
        opt.zero_grad()
        loss = (X @ R - Y).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        assert orthogonality_error(R.data) < 1e-10
    assert losses[-1] < 1e-3 * losses[0]
    assert torch.allclose(R.data, target, atol=1e-3)  # the unique minimiser of ||XR - Y|| over SO(n)


def test_cayley_sgd_rejects_non_square_and_bad_lr():
    with pytest.raises(ValueError, match="lr"):
        CayleySGD([torch.nn.Parameter(torch.eye(3))], lr=0)
    p = torch.nn.Parameter(torch.randn(3, 4))
    p.grad = torch.ones(3, 4)
    with pytest.raises(ValueError, match="square"):
        CayleySGD([p]).step()
