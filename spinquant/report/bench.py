"""Render the benchmark JSONs into Markdown: end-to-end (size, memory, speed vs BF16) and per kernel.

    python scripts/bench_table.py --e2e paper/results/bench_e2e.json --kernels paper/results/bench_kernels.json \
        --out paper/bench_table.md [--splice README.md:bench_table]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..writes import write_text
from .tables import splice


def render_e2e(rows: list[dict]) -> str:
    """One table per model: every engine's rows (ours, llama.cpp's) with ratios to our BF16 and, the headline, to
    llama.cpp Q4_0 measured in the same run."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mrows = [r for r in rows if r["model"] == model]
        r0 = mrows[0]
        q4 = any(r.get("vs_llama_cpp_q4_0") for r in mrows)
        bw = ("served read bandwidth per row (a buffer of the bytes one token reads)" if "served_bandwidth_bytes_s" in r0
              else f"streaming-read bandwidth {r0['mem_bandwidth_bytes_s'] / 1e9:.1f} GB/s")
        head = ("| Engine | Scheme | Size on disk (MB) | × BF16 | Peak RSS (MB) | × BF16 | Prefill tok/s | × BF16 | "
                "Decode tok/s | × BF16 |" + (" Size × Q4_0 | RSS × Q4_0 | Prefill × Q4_0 | Decode × Q4_0 |" if q4 else "")
                + " Decode roofline tok/s | % of roofline |")
        out += [f"**{model}** — {r0['machine']}, {r0['threads']} threads, torch {r0['torch']}, git {r0['git_rev']}; "
                f"prefill {round(r0['prefill_s'] * r0['prefill_tok_s'])} tokens, decode batch 1; {bw}", "",
                head, "|" + "---|" * 2 + "---:|" * (head.count("|") - 3)]
        for r in mrows:
            v = r["vs_bf16"]
            line = (f"| {r.get('engine', 'spinquant')} | {r['scheme']} | {r['size_bytes'] / 1e6:.1f} | "
                    f"{v['size_bytes']:.2f} | {r['peak_rss_bytes'] / 1e6:.0f} | {v['peak_rss_bytes']:.2f} | "
                    f"{r['prefill_tok_s']:.1f} | {v['prefill_tok_s']:.2f} | {r['decode_tok_s']:.2f} | "
                    f"{v['decode_tok_s']:.2f} |")
            if q4:
                w = r.get("vs_llama_cpp_q4_0") or {}
                line += "".join(f" {w[k]:.2f} |" if k in w else " – |"
                                for k in ("size_bytes", "peak_rss_bytes", "prefill_tok_s", "decode_tok_s"))
            out.append(line + f" {r['roofline_decode_tok_s']:.1f} | {100 * r['roofline_frac']:.0f}% |")
        out.append("")
    return "\n".join(out)


def render_kernels(d: dict) -> str:
    p = d["peaks"]
    out = [f"Kernels — {d['machine']}, {d['threads']} threads, git {d['git_rev']}: bandwidth "
           f"{p['mem_bandwidth_bytes_s'] / 1e9:.1f} GB/s, fp32 matmul {p['fp32_matmul_flop_s'] / 1e9:.0f} GFLOP/s, "
           f"bf16 matmul {p['bf16_matmul_flop_s'] / 1e9:.0f} GFLOP/s, int8 `_int_mm` {p['int8_matmul_op_s'] / 1e9:.0f} "
           "GOP/s", "", "| Shape (N×K) | M | Kernel | ms | GB/s | GFLOP/s | % of roofline |",
           "|---|---:|---|---:|---:|---:|---:|"]
    for r in d["rows"]:
        out.append(f"| {r['shape']} ({r['N']}×{r['K']}) | {r['M']} | {r['kernel']} | {r['time_s'] * 1e3:.3f} | "
                   f"{r['gb_s']:.1f} | {r['gflop_s']:.1f} | {100 * r['roofline_frac']:.0f}% ({r['bound']}) |")
    if d.get("hadamard"):
        out += ["", "| Hadamard n (64 tokens) | dense ms | FWHT ms | speed-up |", "|---:|---:|---:|---:|"]
        out += [f"| {h['n']} | {h['dense_s'] * 1e3:.3f} | {h['fwht_s'] * 1e3:.3f} | {h['speedup']:.1f}× |"
                for h in d["hadamard"]]
    if d.get("attention"):
        out += ["", "| One decoded token's attention (32 / 8 heads of 64, bf16 cache) | native µs | sdpa, heads packed µs "
                "| sdpa `enable_gqa` µs |", "|---:|---:|---:|---:|"]
        out += [f"| {a['cache_len']} cached tokens | {a['native_s'] * 1e6:.1f} | {a['sdpa_packed_s'] * 1e6:.1f} | "
                f"{a['sdpa_gqa_s'] * 1e6:.1f} |" for a in d["attention"]]
    if isinstance(d.get("triton"), str):
        out += ["", f"Triton: {d['triton']}."]
    return "\n".join(out) + "\n"


def render_profile(d: dict) -> str:
    """Where one decoded token's time goes (scripts/bench_decode_profile.py): per path, wall ms/token and the timed
    matmuls by role and attention kernel (from an instrumented pass)."""
    paths = list(d["paths"])
    roles = list(dict.fromkeys(k for p in paths for k in d["paths"][p]["matmul_ms_per_token"]))
    out = [f"Decode profile — `{d['folder']}`, {d['threads']} threads, git {d['git_rev']}; {d['tokens']} tokens after a "
           f"{d['prefill']}-token prompt (ms per token)", "",
           "| | " + " | ".join(paths) + " |", "|---|" + "---:|" * len(paths),
           "| **wall** | " + " | ".join(f"**{d['paths'][p]['ms_per_token']:.2f}**" for p in paths) + " |"]
    for r in roles:
        out.append(f"| {r} | " + " | ".join(f"{d['paths'][p]['matmul_ms_per_token'][r]:.2f}"
                                            if r in d["paths"][p]["matmul_ms_per_token"] else "–" for p in paths) + " |")
    out.append("| the rest of the instrumented pass (profiler included) | " + " | ".join(
        f"{d['paths'][p]['instrumented_ms_per_token'] - sum(d['paths'][p]['matmul_ms_per_token'].values()):.2f}"
        for p in paths) + " |")
    return "\n".join(out) + "\n"


def render(e2e: list[dict] | None = None, kernels: dict | None = None, avx2: list[dict] | None = None,
           profile: dict | None = None) -> str:
    """The end-to-end table, the decode profile, the AVX2 end-to-end table, then the kernel table (any may be left
    out)."""
    parts = [render_e2e(e2e)] if e2e is not None else []
    if profile is not None:
        parts.append(render_profile(profile))
    if avx2 is not None:
        parts += ["An AVX2-only machine, simulated on the same one: our kernels built without AVX-512 "
                  "(`SPINQUANT_NATIVE_FLAGS=-mno-avx512f`), torch's own ops and oneDNN capped at AVX2 "
                  "(`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`), against llama.cpp built for AVX2 "
                  "(`GGML_NATIVE=OFF GGML_AVX2=ON GGML_AVX512=OFF`):\n", render_e2e(avx2)]
    if kernels is not None:
        parts.append(render_kernels(kernels))
    return "\n".join(parts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--e2e", type=Path)
    p.add_argument("--kernels", type=Path)
    p.add_argument("--out", type=Path)
    p.add_argument("--splice", action="append", default=[], metavar="FILE:MARKER")
    args = p.parse_args(argv)
    if not (args.e2e or args.kernels):
        p.error("give --e2e and/or --kernels")
    text = render(*(json.loads(f.read_text()) if f else None for f in (args.e2e, args.kernels)))
    print(text)
    if args.out:
        write_text(args.out, text, "benchmark table (--out)")
    for target in args.splice:
        splice(Path(target.rsplit(":", 1)[0]), target.rsplit(":", 1)[1], text)

