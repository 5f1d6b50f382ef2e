"""Triton kernels against float64 references, under TRITON_INTERPRET=1 on the CPU (on a GPU when there is one).
Small sizes, odd shapes, random scales per group: a wrong index, nibble order or scale fails these."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
pytest.importorskip("triton")

from spinquant.kernels import PackedLinear  # noqa: E402
from spinquant.kernels import triton_kernels as tk  # noqa: E402
from spinquant.quant import QuantLinear, QuantSpec  # noqa: E402
from spinquant.quant.rtn import rtn  # noqa: E402
from spinquant.rotation.hadamard import fwht, hadamard  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("n", [8, 64, 256, 384, 172 * 4, 172 * 64, 4096])  # 384 = 12·32; 172 = Goethals–Seidel
def test_hadamard_equals_dense(n):
    x = torch.randn(5, n, dtype=torch.float64)
    want = x @ hadamard(n) / n ** 0.5
    got = tk.hadamard(x.float().to(DEV)).cpu().double()
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert torch.allclose(got, fwht(x), atol=1e-4, rtol=1e-4)


def test_hadamard_refuses_too_large_a_base():
    with pytest.raises(ValueError, match="triton hadamard supports"):
        tk.hadamard(torch.randn(2, 172 * 3 * 128))


def _w4(N, K, group, symmetric, seed=0):
    """Random 4-bit codes, scales and (float) zeros in the export layout, with the dense float64 weight."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(0, 16, (N, K), generator=g)
    groups = 1 if group is None else K // group
    scale = torch.rand(N, groups, generator=g, dtype=torch.float64) * 0.1 + 0.01
    zero = None if symmetric else torch.randn(N, groups, generator=g, dtype=torch.float64) * 0.05
    gs = K if group is None else group
    W = (u.double() - 8) * scale.repeat_interleave(gs, 1)
    if zero is not None:
        W = W + zero.repeat_interleave(gs, 1)
    up = torch.nn.functional.pad(u, (0, K % 2), value=8).to(torch.uint8)
    q = up[:, 0::2] | (up[:, 1::2] << 4)
    return q, scale, zero, W


@pytest.mark.parametrize("M,N,K,group,symmetric", [
    (1, 32, 64, 32, True), (7, 48, 128, 64, False), (33, 40, 96, 32, True), (5, 24, 70, None, False),
    (16, 64, 256, 128, True)])
def test_w4a16_matmul_equals_dense(M, N, K, group, symmetric):
    q, scale, zero, W = _w4(N, K, group, symmetric, seed=M)
    x = torch.randn(M, K, dtype=torch.float64)
    got = tk.w4a16_matmul(x.float().to(DEV), q.to(DEV), scale.float().to(DEV),
                          None if zero is None else zero.float().to(DEV), group).cpu().double()
    assert torch.allclose(got, x @ W.T, atol=1e-4, rtol=1e-4)


def test_w4a16_matmul_runs_a_packed_linear_export():
    """The Triton kernel computes what the CPU-packed module computes, from the same exported tensors."""
    spec = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=32)
    lin = torch.nn.Linear(96, 48, bias=False)
    pl = PackedLinear.from_quant_linear(QuantLinear.from_linear(lin, rtn(lin.weight.data, spec)))
    t = pl.export_tensors()
    x = torch.randn(6, 96)
    got = tk.w4a16_matmul(x.to(DEV), t["qweight"].to(DEV), t["scale"].float().to(DEV), t["zero"].float().to(DEV), 32)
    assert torch.allclose(got.cpu(), pl.reference(x), atol=1e-4, rtol=1e-4)


def test_w4a16_matmul_rejects_bad_layout():
    with pytest.raises(ValueError, match="ceil"):
        tk.w4a16_matmul(torch.randn(2, 64), torch.zeros(8, 31, dtype=torch.uint8), torch.ones(8, 2), None, 32)


@pytest.mark.parametrize("M,N,K,with_zero", [(1, 32, 64, True), (9, 40, 100, True), (33, 16, 48, False)])
def test_int8_matmul_equals_integer_reference(M, N, K, with_zero):
    xq = torch.randint(-128, 128, (M, K), dtype=torch.int8)
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    sx, sw = torch.rand(M) + 0.1, torch.rand(N) + 0.1
    zx = torch.randint(-20, 20, (M,)) if with_zero else None
    acc = (xq.double() - (zx.double()[:, None] if with_zero else 0)) @ w.double().T
    want = acc * sx.double()[:, None] * sw.double()[None, :]
    got = tk.int8_matmul(xq.to(DEV), w.to(DEV), sx.to(DEV), sw.to(DEV), None if zx is None else zx.to(DEV)).cpu()
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-3)
