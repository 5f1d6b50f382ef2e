"""Hadamard matrices of the orders real models need, and the fast Walsh–Hadamard transform.

Constructions (each result is checked: H·Hᵀ = n·I):
- Sylvester: H_{2^k} = H_2 ⊗ ... ⊗ H_2.
- Paley I: q ≡ 3 (mod 4) a prime power -> order q + 1 (12, 20, 28, 44, 60, 68, 72, 84, 108, 140, ...).
- Paley II: q ≡ 1 (mod 4) a prime power -> order 2(q + 1) (12, 20, 28, 36, 52, 60, 76, 100, 108, 148, 924, ...).
- Goethals–Seidel: order 4t from four ±1 circulants of order t whose periodic autocorrelations sum to zero
  (156 = 4·39, 172 = 4·43, 292 = 4·73, ...; 116 and 188 stay out of reach). The circulants are found by a
  small deterministic search: sequences constant on the orbits of a multiplier subgroup of Z_t^* (few orbits -> few candidates),
  quadruples matched meet-in-the-middle on their autocorrelations. Used where Paley gives nothing.
- Kronecker products: n = m · 2^k with m one of the above (e.g. 384 = 12·32, 11008 = 172·64 = 344·32),
  and products of two base orders.
The FWHT multiplies x [..., n] by H_n = H_m ⊗ H_{2^k} in O(n log n + n·m): a butterfly over the 2^k part
and a small dense matmul over the m part.
"""
from __future__ import annotations

import functools
import math

import torch

# ---- finite fields GF(p^k) --------------------------------------------------------------------------------

def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k, p prime, or None."""
    if q < 2:
        return None
    for p in range(2, int(math.isqrt(q)) + 1):
        if q % p == 0:
            k = 0
            while q % p == 0:
                q //= p
                k += 1
            return (p, k) if q == 1 else None
    return (q, 1)


def _polymulmod(a, b, mod, p):
    """Multiply polynomials a, b (coeff lists, low first) over GF(p), reduced mod a monic `mod`."""
    k = len(mod) - 1
    prod = [0] * (2 * k - 1)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            prod[i + j] = (prod[i + j] + x * y) % p
    for d in range(len(prod) - 1, k - 1, -1):  # reduce degree d using x^k = -(mod[0..k-1])
        c = prod[d]
        if c:
            for t in range(k):
                prod[d - k + t] = (prod[d - k + t] - c * mod[t]) % p
            prod[d] = 0
    return prod[:k]


def _polyrem(a: list[int], m: list[int], p: int) -> list[int]:
    """Remainder of a by the monic polynomial m over GF(p) (coefficient lists, low first)."""
    a = list(a)
    k = len(m) - 1
    for d in range(len(a) - 1, k - 1, -1):
        c = a[d]
        if c:
            for t in range(k + 1):
                a[d - k + t] = (a[d - k + t] - c * m[t]) % p
    return a[:k]


def _irreducible(p: int, k: int) -> list[int]:
    """The first monic irreducible polynomial of degree k over GF(p): no monic factor of degree 1..k//2."""
    import itertools
    for tail in itertools.product(range(p), repeat=k):
        poly = list(tail) + [1]
        if all(any(_polyrem(poly, list(f) + [1], p)) for d in range(1, k // 2 + 1)
               for f in itertools.product(range(p), repeat=d)):
            return poly
    raise ValueError(f"no irreducible polynomial of degree {k} over GF({p})")


@functools.lru_cache(maxsize=None)
def _quadratic_character(q: int) -> tuple[list[int], list[list[int]]]:
    """(χ over the q field elements, subtraction table) for GF(q); elements indexed 0..q-1 (base-p digits)."""
    p, k = _prime_power(q)
    if k == 1:
        chi = [0] * q
        for a in range(1, q):
            chi[a * a % q] = 1
        chi = [0] + [1 if chi[a] else -1 for a in range(1, q)]
        sub = [[(i - j) % q for j in range(q)] for i in range(q)]
        return chi, sub
    mod = _irreducible(p, k)

    def digits(i):
        return [(i // p**t) % p for t in range(k)]

    def index(d):
        return sum(c * p**t for t, c in enumerate(d))

    squares = {index(_polymulmod(digits(i), digits(i), mod, p)) for i in range(1, q)}
    chi = [0] + [1 if i in squares else -1 for i in range(1, q)]
    sub = [[index([(x - y) % p for x, y in zip(digits(i), digits(j))]) for j in range(q)] for i in range(q)]
    return chi, sub


def _jacobsthal(q: int) -> torch.Tensor:
    chi, sub = _quadratic_character(q)
    return torch.tensor([[chi[sub[j][i]] for j in range(q)] for i in range(q)], dtype=torch.float64)


def paley1(q: int) -> torch.Tensor:
    """Paley construction I, order q + 1, for a prime power q ≡ 3 (mod 4)."""
    Q = _jacobsthal(q)
    n = q + 1
    S = torch.zeros(n, n, dtype=torch.float64)
    S[0, 1:] = 1
    S[1:, 0] = -1
    S[1:, 1:] = Q
    return torch.eye(n, dtype=torch.float64) + S


def paley2(q: int) -> torch.Tensor:
    """Paley construction II, order 2(q + 1), for a prime power q ≡ 1 (mod 4)."""
    Q = _jacobsthal(q)
    n = q + 1
    C = torch.zeros(n, n, dtype=torch.float64)
    C[0, 1:] = 1
    C[1:, 0] = 1
    C[1:, 1:] = Q
    zero_block = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    one_block = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(C, one_block) + torch.kron((C == 0).double(), zero_block)


def sylvester(n: int) -> torch.Tensor:
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester Hadamard needs a power of two, got {n}")
    H = torch.ones(1, 1, dtype=torch.float64)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.kron(h2, H)
    return H


# ---- Goethals–Seidel -----------------------------------------------------------------------------------------

def _circulant(row: torch.Tensor) -> torch.Tensor:
    """Circulant matrix with first row `row`: C[i, j] = row[(j - i) mod t]."""
    t = row.numel()
    idx = (torch.arange(t)[None, :] - torch.arange(t)[:, None]) % t
    return row[idx]


def _multiplier_subgroups(t: int) -> list[list[int]]:
    """Cyclic subgroups of the units mod t, as element lists (each generated by one unit)."""
    subs = set()
    for g in (u for u in range(1, t) if math.gcd(u, t) == 1):
        S, x = {1}, g
        while x != 1:
            S.add(x)
            x = x * g % t
        subs.add(tuple(sorted(S)))
    return [list(s) for s in subs]


_GS_MAX_ORBITS = 12  # bounds the search: at most 2^12 candidate sequences per subgroup


@functools.lru_cache(maxsize=None)
def _goethals_seidel_rows(t: int) -> tuple[tuple[int, ...], ...] | None:
    """Four ±1 sequences of odd length t with periodic autocorrelations summing to 0 at every shift, or None.

    Searches sequences that are constant on the orbits of a multiplier subgroup G of Z_t^* (2^#orbits
    candidates), keeps those whose power spectrum stays ≤ 4t (a necessary condition), and matches pairs
    (A, B), (C, D) with PAF_A + PAF_B = -(PAF_C + PAF_D) through a linear hash of the PAF vectors.
    Deterministic; milliseconds for the orders it is used for (every hit is verified exactly).
    """
    if t < 3 or t % 2 == 0:
        return None
    shifts = torch.arange(1, t // 2 + 1)
    r = torch.randint(-2**62, 2**62, (len(shifts),), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    groups = []
    for G in _multiplier_subgroups(t):
        orbits, seen = [], set()
        for x in range(t):
            if x not in seen:
                o = sorted({g * x % t for g in G})
                seen.update(o)
                orbits.append(o)
        if len(orbits) <= _GS_MAX_ORBITS:
            groups.append((len(orbits), tuple(G), orbits))
    for _, _, orbits in sorted(groups):
        k = len(orbits)
        bits = ((torch.arange(2**k)[:, None] >> torch.arange(k)) & 1) * 2 - 1
        S = torch.empty(2**k, t, dtype=torch.int64)
        for i, o in enumerate(orbits):
            S[:, o] = bits[:, i:i + 1]
        S = S[S.sum(1) >= 0]  # -A works as well as A
        psd = torch.fft.fft(S.double(), dim=1).abs() ** 2
        S = S[(psd <= 4 * t + 1e-6).all(1)]
        if len(S) == 0:
            continue
        paf = torch.stack([(S * S.roll(-int(s), dims=1)).sum(1) for s in shifts], 1)
        h = paf @ r  # int64 arithmetic wraps: a linear hash, h(u + v) = h(u) + h(v)
        iu, ju = torch.triu_indices(len(S), len(S))
        pair = h[iu] + h[ju]
        for x in torch.nonzero(torch.isin(pair, -pair)).flatten().tolist():
            for y in torch.nonzero(pair == -pair[x]).flatten().tolist():
                rows = [S[iu[x]], S[ju[x]], S[iu[y]], S[ju[y]]]
                if not sum(paf_row for paf_row in (paf[iu[x]], paf[ju[x]], paf[iu[y]], paf[ju[y]])).any():
                    return tuple(tuple(q.tolist()) for q in rows)
    return None


def goethals_seidel(t: int) -> torch.Tensor:
    """Goethals–Seidel array, order 4t: circulants A, B, C, D with A·Aᵀ + B·Bᵀ + C·Cᵀ + D·Dᵀ = 4t·I."""
    rows = _goethals_seidel_rows(t)
    if rows is None:
        raise UnsupportedHadamardSize(f"no Goethals–Seidel sequences of length {t} found by the bounded search")
    A, B, C, D = (_circulant(torch.tensor(q, dtype=torch.float64)) for q in rows)
    R = torch.eye(t, dtype=torch.float64).flip(1)
    return torch.cat([
        torch.cat([A, B @ R, C @ R, D @ R], 1),
        torch.cat([-B @ R, A, D.T @ R, -C.T @ R], 1),
        torch.cat([-C @ R, -D.T @ R, A, B.T @ R], 1),
        torch.cat([-D @ R, C.T @ R, -B.T @ R, A], 1),
    ], 0)


# ---- which orders we can build ------------------------------------------------------------------------------

def _paley_base(m: int) -> tuple[str, int] | None:
    """How to build an order-m matrix directly (m ≡ 0 mod 4, m > 4 not a power of two), or None.

    Paley first (algebraic), then Goethals–Seidel for m = 4t with t odd when its bounded search succeeds.
    """
    if m % 4:
        return None
    pk = _prime_power(m - 1)
    if pk and (m - 1) % 4 == 3:
        return ("paley1", m - 1)
    if m % 2 == 0:
        pk = _prime_power(m // 2 - 1)
        if pk and (m // 2 - 1) % 4 == 1:
            return ("paley2", m // 2 - 1)
    if (m // 4) % 2 == 1 and _goethals_seidel_rows(m // 4) is not None:
        return ("goethals_seidel", m // 4)
    return None


@functools.lru_cache(maxsize=None)
def _recipe(n: int) -> tuple[int, ...] | None:
    """Factors whose Kronecker product builds H_n: (power of two, base, [base2]); None if no construction."""
    if n < 1:
        return None
    pow2 = n & -n
    odd_part_orders = []
    # base m = n / 2^j for each j; prefer the smallest dense base (fastest FWHT)
    candidates = sorted({n // 2**j for j in range(int(math.log2(pow2)) + 1)})
    for m in candidates:
        if m & (m - 1) == 0:
            return (n,)
        if _paley_base(m):
            return (n // m, m)
        odd_part_orders.append(m)
    for m in odd_part_orders:  # m = a · b with both Paley orders
        for a in range(12, int(math.isqrt(m)) + 1, 4):
            if m % a == 0 and _paley_base(a) and _paley_base(m // a):
                return (n // m, a, m // a)
    return None


def is_supported(n: int) -> bool:
    return _recipe(n) is not None


def supported_near(n: int, count: int = 6) -> list[int]:
    """The closest sizes (multiples of 4) that have a construction, for error messages."""
    out, d = [], 0
    while len(out) < count and d < 4 * n:
        for c in {n - d, n + d}:
            if c > 0 and c % 4 == 0 and c not in out and is_supported(c):
                out.append(c)
        d += 1
    return sorted(out)[:count]


class UnsupportedHadamardSize(ValueError):
    pass


def _check(n: int) -> tuple[int, ...]:
    r = _recipe(n)
    if r is None:
        raise UnsupportedHadamardSize(
            f"no Hadamard construction for size {n} (= {n & -n}·{n // (n & -n)}): its odd part needs a base order "
            f"that Paley I/II, Goethals–Seidel or their Kronecker products do not give. "
            f"Sizes near it that work: {supported_near(n)}. "
            f"Use the block-diagonal orthogonal fallback (rotation.fallback=block_diagonal) or another size.")
    return r


@functools.lru_cache(maxsize=64)
def base_matrix(m: int) -> torch.Tensor:
    """The ±1 Hadamard matrix of a base order m (float64), checked H·Hᵀ = m·I."""
    if m & (m - 1) == 0:
        H = sylvester(m)
    else:
        kind, q = _paley_base(m) or (None, None)
        if kind is None:
            raise UnsupportedHadamardSize(f"{m} is not a base order")
        H = {"paley1": paley1, "paley2": paley2, "goethals_seidel": goethals_seidel}[kind](q)
    if not torch.equal(H @ H.T, m * torch.eye(m, dtype=torch.float64)):
        raise AssertionError(f"construction of order {m} failed the H·Hᵀ = n·I check")
    return H


def kron_factors(n: int) -> list[int]:
    """Factor orders of H_n in Kronecker order: H_n = H_{b1} ⊗ [H_{b2} ⊗] H_{2^k} (shared by hadamard and fwht)."""
    r = _check(n)
    return [*r[1:], r[0]]


def hadamard(n: int, dtype=torch.float64) -> torch.Tensor:
    """Dense ±1 Hadamard matrix H_n = H_base (⊗ H_base2) ⊗ H_{2^k}, shape [n, n]."""
    return functools.reduce(torch.kron, [base_matrix(f) for f in kron_factors(n)]).to(dtype)


def _fwht_pow2(x: torch.Tensor) -> torch.Tensor:
    """x @ H_{2^k} (Sylvester, unnormalized) over the last dimension, O(n log n)."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < n:
        x = x.reshape(*lead, n // (2 * h), 2, h)
        a, b = x[..., 0, :], x[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return x.reshape(*lead, n)


def fwht(x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """x [..., n] -> x @ H_n (divided by sqrt(n) if normalize: an orthogonal transform), O(n log n)."""
    n = x.shape[-1]
    *bases, p = kron_factors(n)
    if not bases:
        y = _fwht_pow2(x)
    else:
        m = n // p
        # H_n = H_B ⊗ H_p with H_B = ⊗ bases: reshape to [..., m, p], butterfly over p, dense over m
        y = _fwht_pow2(x.reshape(*x.shape[:-1], m, p))
        HB = functools.reduce(torch.kron, [base_matrix(b) for b in bases]).to(x.dtype).to(x.device)
        y = torch.einsum("...ap,ab->...bp", y, HB).reshape(x.shape)
    return y / math.sqrt(n) if normalize else y


def random_signs(n: int, seed: int = 0) -> torch.Tensor:
    """n random ±1 (float64) from `seed`: the diagonal of a randomized Hadamard."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1


def random_hadamard(n: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """Randomized orthogonal Hadamard: diag(±1) · H_n / sqrt(n) (QuaRot's R1/R2)."""
    return (random_signs(n, seed)[:, None] * hadamard(n) / math.sqrt(n)).to(dtype)
