"""Hadamard constructions (H·Hᵀ = n·I) and the FWHT against the dense float64 product."""
import math

import pytest
import torch

from spinquant.rotation.hadamard import (
    UnsupportedHadamardSize,
    _goethals_seidel_rows,
    _paley_base,
    base_matrix,
    fwht,
    hadamard,
    is_supported,
    random_hadamard,
)

# orders named in the rotations issue (Paley I/II, Kronecker; 156 = 4·39 and 172 = 4·43 by Goethals–Seidel)
# plus the orders Qwen2.5 needs (76, 148) and other Goethals–Seidel orders (124, 132, 164, 220)
BASES = [12, 20, 28, 36, 40, 52, 60, 76, 108, 140, 148, 156, 172, 124, 132, 164, 220]
# hidden / intermediate sizes of real models: Llama-2 7B/13B/70B, Llama-3 8B, Llama-3.2 1B/3B, Mistral 7B,
# Qwen2.5 0.5B/1.5B/3B/7B/14B/72B, our reference model
MODEL_SIZES = [4096, 11008, 5120, 13824, 8192, 28672, 14336, 2048, 3072, 896, 4864, 1536, 8960, 3584, 18944,
               27648, 29568, 384, 1024, 64, 128]


@pytest.mark.parametrize("m", BASES + [344, 924])
def test_base_orders_are_hadamard(m):
    H = base_matrix(m) if _paley_base(m) else hadamard(m)  # 40 = 20 ⊗ 2 is not a base order
    assert set(H.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(H @ H.T, m * torch.eye(m, dtype=torch.float64))


# 1904 = 28·68 and 3952 = 52·76 need two Paley bases: the dense matrix and the FWHT must use the same order
@pytest.mark.parametrize("n", [m * 2**k for m in BASES for k in (0, 3)] + [2**k for k in range(0, 11)] + [1904, 3952])
def test_fwht_matches_dense_product(n):
    x = torch.randn(3, 2, n, dtype=torch.float64)
    ref = x @ hadamard(n) / math.sqrt(n)
    assert torch.allclose(fwht(x), ref, atol=1e-12 * math.sqrt(n), rtol=0)
    assert torch.allclose(fwht(x, normalize=False), x @ hadamard(n), atol=1e-10 * n)


@pytest.mark.parametrize("n", MODEL_SIZES)
def test_every_real_model_size_is_supported_and_orthogonal(n):
    assert is_supported(n)
    x = torch.randn(2, n, dtype=torch.float64)
    y = fwht(x)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12)
    if n <= 4096:
        assert torch.allclose(y, x @ hadamard(n) / math.sqrt(n), atol=1e-12 * math.sqrt(n), rtol=0)


def test_random_hadamard_is_orthogonal_and_seeded():
    R = random_hadamard(384, seed=3)
    assert torch.allclose(R @ R.T, torch.eye(384, dtype=torch.float64), atol=1e-12)
    assert torch.equal(R, random_hadamard(384, seed=3)) and not torch.equal(R, random_hadamard(384, seed=4))


@pytest.mark.parametrize("t", [39, 43, 73, 31, 55])
def test_goethals_seidel_sequences_have_zero_periodic_autocorrelation(t):
    rows = torch.tensor(_goethals_seidel_rows(t), dtype=torch.int64)
    assert rows.shape == (4, t) and set(rows.unique().tolist()) == {-1, 1}
    for s in range(1, t):  # naive loop over every shift, not the half the search uses
        assert int((rows * rows.roll(-s, dims=1)).sum()) == 0
    if t in (39, 43, 73):  # Paley gives nothing at these orders (124 and 220 are Paley II)
        assert _paley_base(4 * t) == ("goethals_seidel", t)


def test_unsupported_size_names_size_and_alternatives():
    with pytest.raises(UnsupportedHadamardSize, match=r"size 188 .*Sizes near it that work: \[.*184, 192"):
        fwht(torch.randn(2, 188))
    with pytest.raises(UnsupportedHadamardSize, match="size 6 "):
        hadamard(6)
