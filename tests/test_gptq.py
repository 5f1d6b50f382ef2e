"""GPTQ against RTN on the same calibration data, and the Hessian against its dense definition."""
import pytest
import torch

from spinquant.quant import QuantSpec, get_weight_quantizer
from spinquant.quant.gptq import HessianAccumulator


def _calib(n=1024, d=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g) / d**0.5
    scales = torch.logspace(-1, 1, d)  # anisotropic, correlated inputs like real activations
    return (torch.randn(n, d, generator=g) @ A) * scales


@pytest.mark.parametrize("spec", [
    QuantSpec(bits=4, granularity="channel"),
    QuantSpec(bits=3, symmetric=False, granularity="channel"),
    QuantSpec(bits=4, granularity="group", group_size=32),
    QuantSpec(bits=4, symmetric=False, granularity="group", group_size=32, clip_search="mse"),
    QuantSpec(bits=2, granularity="group", group_size=64),
])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_output_error_below_rtn(spec, act_order):
    torch.manual_seed(0)
    X, Xt = _calib(n=2048).split(1024)  # calibration rows and held-out rows of the same distribution
    W = torch.randn(96, 128)
    acc = HessianAccumulator(128)
    for chunk in X.split(256):
        acc.add(chunk)
    H = acc.hessian()
    q_rtn = get_weight_quantizer("rtn").fn(W, spec)
    q_gptq = get_weight_quantizer("gptq").fn(W, spec, hessian=H, act_order=act_order, block_size=32)
    err = lambda q, X: (X @ (q.dequantize() - W).T).pow(2).sum().item()  # noqa: E731
    assert err(q_gptq, X) < 0.95 * err(q_rtn, X)    # on the calibration data itself
    assert err(q_gptq, Xt) < 0.95 * err(q_rtn, Xt)  # and it generalises to held-out rows
    assert q_gptq.codes.min() >= spec.qmin and q_gptq.codes.max() <= spec.qmax
    assert q_gptq.scale.shape == q_rtn.scale.shape


def test_hessian_matches_dense_definition():
    X = torch.randn(300, 20)
    acc = HessianAccumulator(20)
    acc.add(X[:100].reshape(4, 25, 20))
    acc.add(X[100:])
    assert torch.allclose(acc.hessian().double(), 2 / 300 * X.double().T @ X.double(), atol=1e-5)


def test_gptq_handles_dead_inputs_and_needs_hessian():
    W = torch.randn(8, 32)
    X = torch.randn(200, 32)
    X[:, 5] = 0  # an input channel that is never active
    H = 2 / 200 * X.T @ X
    q = get_weight_quantizer("gptq").fn(W, QuantSpec(bits=4), hessian=H)
    assert torch.all(q.dequantize()[:, 5] == 0)
    with pytest.raises(ValueError, match="Hessian"):
        get_weight_quantizer("gptq").fn(W, QuantSpec(bits=4))


def test_unknown_weight_quantizer_lists_registered():
    with pytest.raises(KeyError, match="gptq.*rtn|rtn.*gptq"):
        get_weight_quantizer("awq-typo")


def _reference_gptq(W, H, spec, damp=0.01, act_order=False):
    """An independent float64 transcription of GPTQ (Frantar et al. 2022, Algorithm 1) without lazy batching:
    after each column, its scaled error is subtracted from *all* later columns at once. Dead inputs as the
    official code (H_ii = 1, W[:, i] = 0); act-order with static groups (scales from the original weights, each
    column keeps its own group); group scales otherwise taken when the group is reached, from updated weights.
    Scales come from compute_qparams (the part of the quantizer this test is not about)."""
    from spinquant.quant import compute_qparams
    W, H = W.double().clone(), H.double().clone()
    out_f, n = W.shape
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    gs = spec.group_size if spec.granularity == "group" else None
    col_spec = QuantSpec(**{**spec.to_dict(), "granularity": "channel", "group_size": None})
    scale = torch.zeros(out_f, n, dtype=torch.float64)
    zero = torch.zeros(out_f, n, dtype=torch.float64)
    if gs is None:
        s, z = compute_qparams(W, spec)
        scale[:], zero[:] = s.reshape(-1, 1).double(), z.reshape(-1, 1).double()
    elif act_order:
        for g0 in range(0, n, gs):
            s, z = compute_qparams(W[:, g0:g0 + gs], col_spec)
            scale[:, g0:g0 + gs], zero[:, g0:g0 + gs] = s.reshape(-1, 1).double(), z.reshape(-1, 1).double()
    order = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(n)
    Wp, Hp = W[:, order], H[order][:, order]
    Hp = Hp + damp * Hp.diagonal().mean() * torch.eye(n, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hp)), upper=True)
    Q = torch.zeros_like(Wp)
    for i in range(n):
        col = int(order[i])
        if gs is not None and not act_order and col % gs == 0:
            s, z = compute_qparams(Wp[:, i:i + gs], col_spec)
            scale[:, col:col + gs], zero[:, col:col + gs] = s.reshape(-1, 1).double(), z.reshape(-1, 1).double()
        w = Wp[:, i]
        q = torch.clamp(torch.round(w / scale[:, col]) + zero[:, col], spec.qmin, spec.qmax)
        Q[:, i] = q
        err = (w - (q - zero[:, col]) * scale[:, col]) / U[i, i]
        Wp[:, i:] -= err[:, None] * U[i, i:][None, :]
    return Q[:, torch.argsort(order)]


@pytest.mark.parametrize("spec", [
    QuantSpec(bits=4, granularity="channel", clip_search="mse"),
    QuantSpec(bits=3, symmetric=False, granularity="channel"),
    QuantSpec(bits=4, granularity="group", group_size=32),
    QuantSpec(bits=4, symmetric=False, granularity="group", group_size=16),
])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_equals_a_float64_transcription_of_the_algorithm(spec, act_order):
    """Fresh random layer and correlated calibration inputs; our blocked GPTQ in float64 gives the codes of the
    unblocked reference (the lazy block update is exact algebra, not an approximation)."""
    g = torch.Generator().manual_seed(7 + spec.bits + 2 * act_order)
    X = _calib(n=512, d=96, seed=int(torch.randint(0, 1000, (1,), generator=g)))
    X[:, 3] = 0  # a dead input
    W = torch.randn(40, 96, generator=g, dtype=torch.float64)
    H = 2 / len(X) * X.double().T @ X.double()
    want = _reference_gptq(W, H, spec, act_order=act_order)
    got = get_weight_quantizer("gptq").fn(W, spec, hessian=H, act_order=act_order, block_size=32)
    assert torch.equal(got.codes.double(), want)


@pytest.mark.parametrize("spec", [QuantSpec(bits=4, granularity="channel"),
                                  QuantSpec(bits=4, symmetric=False, granularity="group", group_size=16)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_is_block_size_invariant(spec, act_order):
    g = torch.Generator().manual_seed(11)
    X = _calib(n=512, d=128, seed=3)
    W = torch.randn(24, 128, generator=g, dtype=torch.float64)
    H = 2 / len(X) * X.double().T @ X.double()
    codes = [get_weight_quantizer("gptq").fn(W, spec, hessian=H, act_order=act_order, block_size=b).codes
             for b in (1, 16, 48, 128, 1024)]
    assert all(torch.equal(c, codes[0]) for c in codes[1:])
