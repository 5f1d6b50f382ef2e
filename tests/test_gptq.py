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
