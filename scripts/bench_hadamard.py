"""Benchmark: online Hadamard as FWHT vs a dense matmul with the same (orthonormal) matrix.

    python scripts/bench_hadamard.py --out paper/results/bench_hadamard.json

For each size n (powers of two and the non-power-of-two sizes real models use) it times x @ H/sqrt(n)
(dense, matrix precomputed) and fwht(x) on x [tokens, n] in float32, median of `--repeats` runs after
warm-up, and checks both agree. Writes one JSON object per size with the times and their ratio.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spinquant.results import revision_for  # noqa: E402
from spinquant.rotation.hadamard import fwht, hadamard  # noqa: E402

SIZES = [256, 384, 1024, 2048, 3072, 4096, 4864, 8192, 11008, 14336]


def _time(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--sizes", type=int, nargs="*", default=SIZES)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    rev = revision_for(args.out)  # committed results only from a clean checkout: checked before measuring
    rows = []
    for n in args.sizes:
        x = torch.randn(args.tokens, n)
        H = (hadamard(n) / math.sqrt(n)).float()
        err = (fwht(x) - x @ H).abs().max().item()
        dense = _time(lambda: x @ H, args.repeats)
        fast = _time(lambda: fwht(x), args.repeats)
        rows.append({"n": n, "tokens": args.tokens, "dense_s": dense, "fwht_s": fast, "speedup": dense / fast,
                     "max_abs_diff": err})
        print(f"n={n:6d}  dense {dense * 1e3:8.3f} ms  fwht {fast * 1e3:8.3f} ms  speedup {dense / fast:6.2f}x  "
              f"max diff {err:.1e}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                        "threads": torch.get_num_threads(), "torch": torch.__version__,
                                        "git_rev": rev, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
