"""Kernel benchmark: each packed linear kernel against torch's dense matmuls and the machine's roofline.

    python scripts/bench_kernels.py --out paper/results/bench_kernels.json

Shapes are Llama-3.2-1B's linears (q/o 2048x2048, k/v 512x2048, gate/up 8192x2048, down 2048x8192,
lm_head 128256x2048) at M = 1 (decode) and M = 512 (prefill) tokens. For each kernel: median time,
bytes moved (weights at their stored size + activations in and out), GB/s, GFLOP/s (2·M·N·K), and the
fraction of the roofline time max(bytes / bandwidth, flops / peak) reached, with the bandwidth (streaming
read of 1 GiB) and the peaks (large fp32 / bf16 matmuls, int8 `_int_mm`) measured in the same run.
Weights that fit in the CPU caches (k/v at M=1: 0.5-2 MB) are re-read from cache between repeats and can
exceed the DRAM roofline; the large shapes (gate/up, down, lm_head) are the honest memory-bound numbers.
The native kernels run the build `SPINQUANT_NATIVE_FLAGS` selects (default: this CPU's best vector path;
"-mno-avx512f" times the AVX2 path on an AVX-512 machine; the output records which, `native_simd`: 1 AVX-512
VNNI, 2 AVX2). It also times the online Hadamard as FWHT against a dense matmul, and one decoded token's attention
(Llama-3.2-1B's 32 query / 8 KV heads of 64, bf16 cache) on the native kernel against torch's sdpa, with the query
heads packed per KV head (what `spinquant_attention` does) and with `enable_gqa`. On a CUDA machine the Triton kernels are
timed too; on the CPU they only run under TRITON_INTERPRET (for correctness, see tests).
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
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spinquant.kernels import PackedLinear, native  # noqa: E402
from spinquant.kernels.linear import NATIVE  # noqa: E402
from spinquant.quant import QuantLinear, QuantSpec  # noqa: E402
from spinquant.quant.rtn import rtn  # noqa: E402
from spinquant.results import revision_for  # noqa: E402
from spinquant.rotation.hadamard import fwht, hadamard  # noqa: E402

SHAPES = {"q/o": (2048, 2048), "k/v": (512, 2048), "gate/up": (8192, 2048), "down": (2048, 8192),
          "lm_head": (128256, 2048)}
A8 = QuantSpec(bits=8, symmetric=False, granularity="token", dynamic=True)
W4G32 = QuantSpec(bits=4, granularity="group", group_size=32)
KERNELS = {  # name -> (weight spec or dense dtype, activation spec, PackedLinear kernel)
    "fp32 dense": ("float32", None, None),
    "bf16 dense": ("bfloat16", None, None),
    "W4A16 int4pack g32": (W4G32, None, "int4"),
    "W8A16 int8pack": (QuantSpec(bits=8), None, "int8"),
    "W4A8 int4pack g32 + int8 act": (W4G32, A8, "int4"),
    "W8A8 _int_mm": (QuantSpec(bits=8), A8, "int8"),
    "W4A8 native g32 (cpu_w4a8)": (W4G32, A8, "cpu_w4a8"),
    "W8A8 native (cpu_w8a8)": (QuantSpec(bits=8), A8, "cpu_w8a8"),
}


def _time(fn, repeats: int, min_s: float = 0.2) -> float:
    t_warm = time.perf_counter()
    while time.perf_counter() - t_warm < 0.05:  # first uses of fresh weights run slower here (page faults)
        fn()
    ts, t_all = [], time.perf_counter()
    while len(ts) < repeats or time.perf_counter() - t_all < min_s:
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
        if len(ts) >= 10 * repeats:
            break
    return statistics.median(ts)


def machine_peaks(repeats: int) -> dict:
    x = torch.ones(2**28)  # 1 GiB float32
    bw = x.numel() * 4 / _time(lambda: x.sum(), repeats)
    peaks = {"mem_bandwidth_bytes_s": bw}
    n = 2048
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
        peaks[f"{name}_matmul_flop_s"] = 2 * n**3 / _time(lambda: a @ b, repeats)
    a, b = torch.randint(-128, 127, (n, n), dtype=torch.int8), torch.randint(-128, 127, (n, n), dtype=torch.int8)
    peaks["int8_matmul_op_s"] = 2 * n**3 / _time(lambda: torch._int_mm(a, b), repeats)
    return peaks


def _module(kernel: str, N: int, K: int):
    w_spec, a_spec, name = KERNELS[kernel]
    lin = nn.Linear(K, N, bias=False)
    nn.init.normal_(lin.weight, std=0.02)
    if isinstance(w_spec, str):
        lin = lin.to(getattr(torch, w_spec))
        return lin, lin.weight.numel() * lin.weight.element_size(), lin.weight.dtype
    pl = PackedLinear.from_quant_linear(QuantLinear.from_linear(lin, rtn(lin.weight.data, w_spec), a_spec), name)
    wbytes = sum(b.numel() * b.element_size() for b in pl.weight_buffers())
    return pl, wbytes, torch.bfloat16


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="*", default=[1, 512])
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--hadamard-sizes", type=int, nargs="*", default=[384, 2048, 8192, 11008, 14336])
    p.add_argument("--cache-lengths", type=int, nargs="*", default=[128, 512, 2048])
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    rev = revision_for(args.out)  # committed results only from a clean checkout: checked before measuring
    peaks = machine_peaks(args.repeats)
    print("machine: " + ", ".join(f"{k} {v / 1e9:.1f} G" for k, v in peaks.items()), flush=True)
    rows = []
    for shape in args.shapes:
        N, K = SHAPES[shape]
        for kernel in KERNELS:
            if KERNELS[kernel][2] in NATIVE and not native.available():
                continue
            mod, wbytes, act_dtype = _module(kernel, N, K)
            for M in args.tokens:
                x = torch.randn(M, K, dtype=act_dtype)
                with torch.inference_mode():
                    t = _time(lambda: mod(x), args.repeats)
                flops = 2 * M * N * K
                nbytes = wbytes + (M * K + M * N) * x.element_size()
                # compute peak: int8 GEMM for _int_mm (M >= 16) and the native integer kernels, else the faster
                # dense float matmul (torch's int4/int8 weight kernels dequantize to fp32 FMAs; a CPU without
                # bf16 FMAs runs bf16 matmuls slower)
                integer = ("_int_mm" in kernel and M >= 16) or "native" in kernel
                peak = peaks["int8_matmul_op_s"] if integer else max(
                    peaks["fp32_matmul_flop_s"], peaks["bf16_matmul_flop_s"])
                t_roof = max(nbytes / peaks["mem_bandwidth_bytes_s"], flops / peak)
                rows.append({"kernel": kernel, "shape": shape, "M": M, "N": N, "K": K, "time_s": t,
                             "native_simd": native.simd() if native.builds() else None,
                             "weight_bytes": wbytes, "gb_s": nbytes / t / 1e9, "gflop_s": flops / t / 1e9,
                             "roofline_frac": t_roof / t, "bound": "memory" if nbytes / peaks["mem_bandwidth_bytes_s"]
                             >= flops / peak else "compute"})
                r = rows[-1]
                print(f"{shape:8s} M={M:4d} {kernel:30s} {t * 1e3:9.3f} ms  {r['gb_s']:7.1f} GB/s  "
                      f"{r['gflop_s']:8.1f} GFLOP/s  {100 * r['roofline_frac']:5.1f}% of roofline ({r['bound']})",
                      flush=True)
    had = []
    for n in args.hadamard_sizes:
        x = torch.randn(64, n)
        H = (hadamard(n) / math.sqrt(n)).float()
        dense, fast = _time(lambda: x @ H, args.repeats), _time(lambda: fwht(x), args.repeats)
        had.append({"n": n, "tokens": 64, "dense_s": dense, "fwht_s": fast, "speedup": dense / fast})
        print(f"hadamard n={n:6d}: dense {dense * 1e3:8.3f} ms, fwht {fast * 1e3:8.3f} ms ({dense / fast:.1f}x)")
    attention = []
    if native.builds():
        import torch.nn.functional as F
        for length in args.cache_lengths:
            k, v = torch.randn(8, length, 64).bfloat16(), torch.randn(8, length, 64).bfloat16()
            kt, q = k.transpose(1, 2).contiguous(), torch.randn(8, 4, 64)
            qb, qh = q.bfloat16()[None], q.bfloat16().reshape(1, 32, 1, 64)
            ours = _time(lambda: native.attend_one_token(q, kt, v, length, 0.125), args.repeats)
            packed = _time(lambda: F.scaled_dot_product_attention(qb, k[None], v[None], scale=0.125), args.repeats)
            gqa = _time(lambda: F.scaled_dot_product_attention(qh, k[None], v[None], scale=0.125, enable_gqa=True),
                        args.repeats)
            attention.append({"cache_len": length, "native_s": ours, "sdpa_packed_s": packed, "sdpa_gqa_s": gqa})
            print(f"attention len={length:5d}: native {ours * 1e6:7.1f} us, sdpa packed {packed * 1e6:7.1f} us, "
                  f"sdpa gqa {gqa * 1e6:7.1f} us")
    triton_rows = []
    if torch.cuda.is_available():  # Triton kernels on the GPU (never timed under the interpreter)
        from spinquant.kernels import triton_kernels as tk
        for n in args.hadamard_sizes:
            x = torch.randn(4096, n, device="cuda", dtype=torch.bfloat16)
            t = _time(lambda: (tk.hadamard(x), torch.cuda.synchronize()), args.repeats)
            triton_rows.append({"kernel": "triton hadamard", "n": n, "rows": 4096, "time_s": t,
                                "gb_s": 2 * x.numel() * 2 / t / 1e9})
    out = {"machine": f"{platform.machine()} {platform.processor()}".strip(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "git_rev": rev, "peaks": peaks, "rows": rows, "hadamard": had,
           "attention": attention,
           "triton": triton_rows or "not measured: no CUDA device in this run"}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
