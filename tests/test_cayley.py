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
        assert orthogonality_error(R.data) < 3e-8  # rows renormalised by ||r|| + 1e-8 each step, as the official code
    assert losses[-1] < 1e-3 * losses[0]
    assert torch.allclose(R.data, target, atol=1e-3)  # the unique minimiser of ||XR - Y|| over SO(n)


def test_cayley_sgd_rejects_non_square_and_bad_lr():
    with pytest.raises(ValueError, match="lr"):
        CayleySGD([torch.nn.Parameter(torch.eye(3))], lr=0)
    p = torch.nn.Parameter(torch.randn(3, 4))
    p.grad = torch.ones(3, 4)
    with pytest.raises(ValueError, match="square"):
        CayleySGD([p]).step()


def _official_sgdg_step(P, G, lr, do_qr):
    """An independent float64 transcription of one step of the official SpinQuant SGDG (train_utils/optimizer.py,
    stiefel=True, momentum 0), written from its listing line by line."""
    P, G = P.double(), G.double()
    unity = P / (P.norm(p=2, dim=1, keepdim=True) + 1e-8)          # unit(p.data.view(n, -1))
    if do_qr:                                                       # qr_retraction(unity)
        q, r = torch.linalg.qr(unity.t())
        q = q * r.diag().sign().expand_as(q)
        unity = q.t()
    V = 0 * torch.zeros_like(G.t()) - G.t()                         # momentum * V - g.t()
    MX = torch.mm(V, unity)
    XMX = torch.mm(unity, MX)
    XXMX = torch.mm(unity.t(), XMX)
    W_hat = MX - 0.5 * XXMX
    W = W_hat - W_hat.t()
    t = 0.5 * 2 / (torch.max(torch.sum(torch.abs(W), dim=0)) + 1e-8)
    alpha = min(t.item(), lr)
    X = unity.t()                                                   # Cayley_loop(unity.t(), W, V, alpha)
    Y = X + alpha * V
    for _ in range(5):
        Y = X + alpha * torch.mm(W, 0.5 * (X + Y))
    return Y.t(), alpha


def _qr_draws(seed, n):
    g = torch.Generator().manual_seed(seed)
    return [int(torch.randint(1, 102, (1,), generator=g)) == 1 for _ in range(n)]


@pytest.mark.parametrize("n,lr,grad_scale,cap", [(8, 1.5, 1.0, "all"), (24, 1.5, 0.01, "none"), (12, 0.05, 3.0, "some"),
                                                 (64, 1.5, 0.3, "all")])
def test_iterative_step_equals_the_official_sgdg_transcription(n, lr, grad_scale, cap):
    """On fresh random orthogonal parameters and gradients, several steps of CayleySGD(retraction='iterative') equal
    the official update (same QR draws), including the step cap min(lr, 1/||W||_1) and its active branch."""
    g = torch.Generator().manual_seed(n)
    P0, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    p = torch.nn.Parameter(P0.clone())
    seed = next(s for s in range(1000) if any(_qr_draws(s, 40)))  # a seed whose draws take the QR branch
    opt = CayleySGD([p], lr=lr, retraction="iterative", seed=seed)
    want = P0.clone()
    draws = _qr_draws(seed, 40)
    capped = []
    for k in range(40):
        G = grad_scale * torch.randn(n, n, dtype=torch.float64, generator=g)
        p.grad = G.clone()
        opt.step()
        want, alpha = _official_sgdg_step(want, G, lr, draws[k])
        assert opt.last_alpha[0] == pytest.approx(alpha, rel=1e-12)
        capped.append(alpha < lr)
        assert torch.allclose(p.data, want, rtol=0, atol=1e-12), (k, (p.data - want).abs().max())
    assert any(draws)  # the QR branch was exercised at least once in these 40 steps
    # which branch of min(lr, 1/||W||_1) set the steps: the cap (large gradients), lr (small ones), or both
    assert {"all": all(capped), "none": not any(capped), "some": any(capped) and not all(capped)}[cap]


def test_exact_and_iterative_retraction_agree_to_the_contraction_bound():
    """The official 5-step fixed point converges to the exact Cayley transform at rate alpha*||W||/2 <= 1/2 per
    iteration; the exact solve is orthogonal to rounding, the iterate only approximately."""
    from spinquant.rotation.cayley import cayley_retraction, skew_generator, step_size, unit_rows
    g = torch.Generator().manual_seed(1)
    for n in (8, 32, 64):
        X = unit_rows(torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))[0])
        G = torch.randn(n, n, dtype=torch.float64, generator=g)
        W = skew_generator(X, G)
        alpha = step_size(W, 1.5)
        exact = cayley_retraction(X, W, -G.T, alpha, "exact")
        errs = [(cayley_retraction(X, W, -G.T, alpha, "iterative", iters=k) - exact).abs().max().item() for k in (1, 3, 5, 12)]
        assert orthogonality_error(exact) < 3e-8  # exact up to the official 1e-8 in the row normalisation
        assert errs[0] > errs[1] > errs[2] > errs[3]  # converging to the exact solution
        assert errs[2] <= errs[0] * 0.5 ** 4 * 1.0001  # contraction factor <= 1/2 (1-norm bound)
        assert errs[3] < 1e-5


def test_skew_generator_is_the_riemannian_gradient_for_orthogonal_x():
    """For orthogonal X the official W = V·X − ½·Xᵀ·X·V·X (V = −Gᵀ) reduces to ½(XᵀG − GᵀX): skew, and a descent
    direction (the first-order change of the loss along P(t) = ((I + tW)Xᵀ)ᵀ is negative)."""
    from spinquant.rotation.cayley import skew_generator
    g = torch.Generator().manual_seed(2)
    X, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64, generator=g))
    G = torch.randn(16, 16, dtype=torch.float64, generator=g)
    W = skew_generator(X, G)
    assert torch.allclose(W, 0.5 * (X.T @ G - G.T @ X), atol=1e-13)
    assert torch.sum(G * (W @ X.T).T).item() < 0


def test_cosine_schedule_equals_transformers():
    """Our per-step learning rate equals transformers' get_cosine_schedule_with_warmup(0 warm-up) used by the
    official run's Trainer (an independent implementation)."""
    from transformers import get_cosine_schedule_with_warmup

    from spinquant.rotation.cayley import cosine_lr
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.5)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=0, num_training_steps=100)
    for step in range(100):
        assert cosine_lr(1.5, step, 100) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
        opt.step()
        sched.step()
