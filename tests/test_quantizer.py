"""Quantize / dequantize math against a float64 naive-loop reference."""
import itertools
import zlib

import pytest
import torch

from spinquant.quant import QuantSpec, compute_qparams, dequantize, fake_quantize, quantize


def reference_fake_quant(x: torch.Tensor, bits: int, sym: bool, granularity: str, group: int | None, clip=1.0):
    """float64 loop over groups: range incl. 0, scale, zero, round, clamp, dequant."""
    x = x.double()
    out = torch.empty_like(x)
    rows = [x.reshape(-1)] if granularity == "tensor" else list(x)
    outs = [out.view(-1)] if granularity == "tensor" else list(out)
    for r, o in zip(rows, outs):
        g = group if granularity == "group" else r.numel()
        for s in range(0, r.numel(), g):
            seg = r[s: s + g]
            lo, hi = min(seg.min().item(), 0.0) * clip, max(seg.max().item(), 0.0) * clip
            if sym:
                qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
                scale, zero = max(abs(lo), abs(hi)) / qmax, 0.0
            else:
                qmin, qmax = 0, 2**bits - 1
                scale = (hi - lo) / qmax
                zero = round(-lo / scale) if scale > 0 else 0.0
            scale = scale if scale > 0 else 1.0
            for j in range(seg.numel()):
                q = min(max(round(seg[j].item() / scale) + zero, qmin), qmax)
                o[s + j] = (q - zero) * scale
    return out


@pytest.mark.parametrize("granularity,sym", itertools.product(["tensor", "channel", "group", "token"], [True, False]))
def test_fake_quant_matches_float64_reference(granularity, sym):
    torch.manual_seed(zlib.crc32(f"{granularity}{sym}".encode()))  # hash() of str is salted per process
    for bits in range(2, 9):
        x = torch.randn(5, 48, dtype=torch.float64) * torch.rand(5, 1, dtype=torch.float64) * 3
        group = 16 if granularity == "group" else None
        spec = QuantSpec(bits=bits, symmetric=sym, granularity=granularity, group_size=group, clip_ratio=0.9)
        ref = reference_fake_quant(x, bits, sym, granularity, group, clip=0.9)
        got = fake_quantize(x.float(), spec).double()
        scale_bound = x.abs().max().item() / (2 ** (bits - 1) - 1 if sym else 2**bits - 1)
        assert torch.allclose(got, ref, atol=1e-5 * scale_bound + 1e-6), (bits, (got - ref).abs().max())
        # integer codes stay on the grid and dequantize to the same values
        s, z = compute_qparams(x.float(), spec)
        q = quantize(x.float(), s, z, spec)
        assert q.min() >= spec.qmin and q.max() <= spec.qmax
        assert torch.allclose(dequantize(q, s, z, spec).double(), got, atol=1e-6)


def test_levels_per_row_bounded_by_bits():
    x = torch.randn(8, 256)
    for bits in (2, 3, 4, 8):
        y = fake_quantize(x, QuantSpec(bits=bits, symmetric=False, granularity="token"))
        assert max(len(torch.unique(r)) for r in y) <= 2**bits


def test_sixteen_bits_is_identity():
    x = torch.randn(4, 32)
    assert fake_quantize(x, QuantSpec(bits=16)) is x


@pytest.mark.parametrize("granularity", ["channel", "group", "tensor"])
def test_mse_clip_never_worse_than_no_clip(granularity):
    torch.manual_seed(1)
    x = torch.distributions.StudentT(2.0).sample((32, 128))  # heavy tails: clipping should pay off
    group = 32 if granularity == "group" else None
    for bits in (2, 3, 4, 8):
        plain = QuantSpec(bits=bits, granularity=granularity, group_size=group)
        mse = QuantSpec(bits=bits, granularity=granularity, group_size=group, clip_search="mse")
        e_plain = (fake_quantize(x, plain) - x).pow(2).reshape(32, -1).sum(-1) if granularity != "tensor" else \
            (fake_quantize(x, plain) - x).pow(2).sum()
        e_mse = (fake_quantize(x, mse) - x).pow(2).reshape(32, -1).sum(-1) if granularity != "tensor" else \
            (fake_quantize(x, mse) - x).pow(2).sum()
        assert (e_mse <= e_plain * (1 + 1e-6)).all()
        if bits <= 4:
            assert e_mse.sum() < 0.9 * e_plain.sum()


def test_ste_gradient_is_identity_inside_range_zero_outside():
    torch.manual_seed(3)
    x = torch.randn(6, 40, requires_grad=True)
    spec = QuantSpec(bits=4, symmetric=False, granularity="token", clip_ratio=0.6)
    y = fake_quantize(x, spec)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    s, z = compute_qparams(x.detach(), spec)
    u = x.detach() / s.reshape(6, 1) + z.reshape(6, 1)
    inside = (u.round() >= spec.qmin) & (u.round() <= spec.qmax)
    assert (~inside).any() and inside.any()
    expected = torch.where(inside, g, torch.zeros_like(g))
    # clamp passes gradient where round(u) lands inside [qmin, qmax]
    lo, hi = (u.round() == spec.qmin), (u.round() == spec.qmax)
    edge = lo | hi
    assert torch.allclose(x.grad[~edge], expected[~edge], rtol=1e-6, atol=0)
    assert (x.grad[~inside & ~edge] == 0).all()


@pytest.mark.parametrize("bad", [1, 9, 0, 12, 4.0])
def test_bits_out_of_range_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits=bad)


def test_group_size_must_divide():
    spec = QuantSpec(bits=4, granularity="group", group_size=48)
    with pytest.raises(ValueError, match="group_size 48 does not divide.*100"):
        fake_quantize(torch.randn(3, 100), spec)
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(bits=4, granularity="group")
    with pytest.raises(ValueError, match="granularity"):
        QuantSpec(bits=4, granularity="row")
