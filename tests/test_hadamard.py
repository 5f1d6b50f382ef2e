"""Hadamard constructions (H·Hᵀ = n·I) and the FWHT against the dense float64 product."""
import math

import pytest
import torch

from spinquant.rotation.hadamard import UnsupportedHadamardSize, base_matrix, fwht, hadamard, is_supported, random_hadamard

# orders named in the rotations issue that Paley / Sylvester / Kronecker reach (156, 172 need Williamson)
BASES = [12, 20, 28, 36, 40, 52, 60, 76, 108, 140, 148]
# hidden / intermediate sizes of real models: Llama-2 7B/13B/70B, Llama-3 8B, Llama-3.2 1B/3B, Mistral 7B,
# Qwen2.5 0.5B/1.5B/3B/7B/14B/72B, our reference model
MODEL_SIZES = [4096, 11008, 5120, 13824, 8192, 28672, 14336, 2048, 3072, 896, 4864, 1536, 8960, 3584, 18944,
               27648, 29568, 384, 1024, 64, 128]


@pytest.mark.parametrize("m", BASES + [344, 924])
def test_base_orders_are_hadamard(m):
    H = hadamard(m)
    if m != 40:
        assert torch.equal(H, base_matrix(m))
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


def test_unsupported_size_names_size_and_alternatives():
    with pytest.raises(UnsupportedHadamardSize, match=r"size 4·43.*|size 172 .*Sizes near it that work: \[.*168"):
        fwht(torch.randn(2, 172))
    with pytest.raises(UnsupportedHadamardSize, match="size 6 "):
        hadamard(6)
