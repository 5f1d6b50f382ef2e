"""Is a perplexity difference noise? The paired standard error of two runs scored on the same windows.

Each perplexity row records the NLL sum of every window (`ppl_detail[ds].window_nll`). For a row A and a
baseline B on the same windows, d_i = nll_A,i − nll_B,i; the difference of mean token NLL is Δ = Σd / T (T
tokens scored) and, treating windows as the independent units, SE(Δ) = √n · sd(d) / T (n windows, sd with
n − 1). Perplexity ratio exp(Δ); by the delta method SE(ppl_A − ppl_B) ≈ ppl_A · SE(Δ). A difference within
two paired standard errors is marked as noise in the tables.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class PairedDiff:
    delta_nll: float     # mean token NLL of A minus B (nats)
    se_nll: float        # its paired standard error
    delta_ppl: float     # ppl_A − ppl_B
    se_ppl: float        # delta-method standard error of delta_ppl
    windows: int

    @property
    def within_noise(self) -> bool:
        """|Δ| within two paired standard errors."""
        return abs(self.delta_nll) <= 2 * self.se_nll


def window_se(sums: list[float], tokens: int) -> float:
    """Standard error of a per-token mean Σsums / tokens, windows as the independent units: √n · sd(sums) / tokens
    (sd with n − 1; inf for one window). `sums`: a per-window quantity summed over each window's tokens."""
    n = len(sums)
    if n < 2:
        return math.inf
    mean = math.fsum(sums) / n
    return math.sqrt(n) * math.sqrt(math.fsum((x - mean) ** 2 for x in sums) / (n - 1)) / tokens


def same_windows(a: dict, b: dict) -> bool:
    """Whether two results (a row's ppl_detail[ds]) scored the same windows, so that they pair window by window."""
    return (a.get("window_tokens") == b.get("window_tokens")
            and (a.get("seq_len"), a.get("stride")) == (b.get("seq_len"), b.get("stride")))


def paired_diff(a: dict, b: dict) -> PairedDiff:
    """a, b: `PerplexityResult.to_dict()`s (a row's ppl_detail[ds]) of two runs on the same windows."""
    wa, wb = a.get("window_nll"), b.get("window_nll")
    if not wa or not wb:
        raise ValueError("paired standard errors need per-window NLL sums (window_nll) in both results")
    if not same_windows(a, b):
        raise ValueError(f"not the same windows: {a['windows']} windows of {a['seq_len']} (stride {a['stride']}) vs "
                         f"{b['windows']} of {b['seq_len']} (stride {b['stride']})")
    n, tokens = len(wa), sum(a["window_tokens"])
    d = [x - y for x, y in zip(wa, wb)]
    delta, se = math.fsum(d) / tokens, window_se(d, tokens)
    ppl_a = math.exp(math.fsum(wa) / tokens)
    return PairedDiff(delta, se, ppl_a - math.exp(math.fsum(wb) / tokens), ppl_a * se, n)
