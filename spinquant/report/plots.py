"""Pareto plots from results rows: model size vs perplexity, and decode speed vs perplexity.

    python scripts/plot_pareto.py paper/results/foundation paper/results/rotation paper/results/qat \
        --bench paper/results/bench_e2e.json --out paper/figures

size_vs_ppl_<model>.png: every quantized row of a model (x: stored size in MB, y: wikitext2 perplexity), FP
as a dashed line, the Pareto front (no other row is both smaller and better) joined and labelled.
speed_vs_ppl.png: per scheme, decode tokens/s of the packed Llama-3.2-1B-shaped model (bench_e2e.json,
2-core CPU; speed depends on shapes, not weights) against the best reference-model perplexity at that scheme.
PNGs carry no timestamp or version metadata, so reruns are byte-identical (matplotlib is pinned).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..results import read_rows
from . import tables as make_tables

DATASET = "wikitext2"
FAMILY_COLORS = {"FP": "black", "PTQ": "tab:blue", "Rotation": "tab:orange", "QAT": "tab:green"}


def _family(row) -> str:
    m = row["method"]
    if row["spec"].get("w_bits", 16) >= 16 and m.get("qat", "none") == "none":
        return "FP"
    if m.get("qat", "none") != "none":
        return "QAT"
    return "Rotation" if m.get("rotation", "none") != "none" else "PTQ"


def _label(row) -> str:
    """e.g. "W2A16-g64 gptq", "W4A16 spinquant+rtn": the QAT table's scheme name and the method name."""
    return f"{make_tables._qat_scheme(row)} {make_tables._method(row)}"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both x and y (smaller is better on both), by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def _figure():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.size": 9, "svg.hashsalt": "spinquant"})
    return plt


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, metadata={"Software": None}, bbox_inches="tight")


def size_vs_ppl(rows: list[dict], model: str, path: Path) -> Path:
    plt = _figure()
    rows = [r for r in rows if r["model"] == model and DATASET in r["metrics"]["ppl"] and r["metrics"].get("size_bytes")]
    if not rows:
        raise SystemExit(f"no {model} rows with {DATASET} perplexity and size_bytes")
    seen, uniq = set(), []
    for r in sorted(rows, key=lambda r: (r["metrics"]["size_bytes"], r["metrics"]["ppl"][DATASET], _label(r))):
        key = (_label(r), round(r["metrics"]["ppl"][DATASET], 2))  # the same run in several tables: one point
        if key not in seen:
            seen.add(key)
            uniq.append(r)
    fp = [r for r in uniq if _family(r) == "FP"]
    q = [r for r in uniq if min(r["spec"].get(k, 16) for k in ("w_bits", "a_bits", "kv_bits")) < 16]  # not FP controls
    pts = [(r["metrics"]["size_bytes"] / 1e6, r["metrics"]["ppl"][DATASET]) for r in q]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for fam, color in FAMILY_COLORS.items():
        xs = [p for p, r in zip(pts, q) if _family(r) == fam]
        if xs:
            ax.scatter([x for x, _ in xs], [y for _, y in xs], s=18, color=color, alpha=0.75, label=fam, zorder=3)
    front = pareto_front(pts)
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], color="tab:red", lw=1, zorder=2, label="Pareto front")
    for i in front:
        ax.annotate(_label(q[i]), pts[i], textcoords="offset points", xytext=(4, 3), fontsize=6.5)
    if fp:
        y = fp[0]["metrics"]["ppl"][DATASET]
        ax.axhline(y, color="black", ls="--", lw=0.8, label=f"FP ({fp[0]['metrics']['size_bytes'] / 1e6:.1f} MB)")
    ax.set_xlabel("stored size (MB)")
    ax.set_ylabel(f"{DATASET} perplexity (lower is better)")
    ax.set_title(f"{model}: size vs perplexity ({len(q)} quantized runs)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    _save(fig, path)
    plt.close(fig)
    return path


BENCH_TO_SCHEME = {"BF16": "W16A16", "W8A8": "W8A8", "W4A16": "W4A16", "W4A8": "W4A8"}


def speed_vs_ppl(rows: list[dict], bench: list[dict], model: str, bench_model: str, path: Path) -> Path:
    plt = _figure()
    best: dict[str, dict] = {}
    for r in rows:
        if r["model"] != model or DATASET not in r["metrics"]["ppl"] or r["method"].get("qat", "none") != "none":
            continue
        if r["method"].get("rotation", "none") != "none" or r["scheme"] not in BENCH_TO_SCHEME.values():
            continue
        if r["scheme"] not in best or r["metrics"]["ppl"][DATASET] < best[r["scheme"]]["metrics"]["ppl"][DATASET]:
            best[r["scheme"]] = r
    pts = []
    for b in bench:
        scheme = BENCH_TO_SCHEME.get(b["scheme"])
        if b["model"] == bench_model and scheme in best:
            r = best[scheme]
            pts.append((b["scheme"], b["decode_tok_s"], r["metrics"]["ppl"][DATASET], r["method"]["weights"]))
    if not pts:
        raise SystemExit(f"no {bench_model} benchmark matches a {model} row")
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    ax.scatter([p[1] for p in pts], [p[2] for p in pts], color="tab:blue", zorder=3)
    for name, x, y, method in pts:
        ax.annotate(f"{name} ({method})" if method != "none" else name, (x, y), textcoords="offset points",
                    xytext=(4, 3), fontsize=7)
    ax.set_xlabel(f"decode tokens/s, packed {bench_model} (2-core CPU)")
    ax.set_ylabel(f"{model} {DATASET} perplexity")
    ax.set_title("decode speed vs perplexity (right and down is better)")
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)
    return path


def main(argv=None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="results folders or row files")
    p.add_argument("--bench", type=Path, help="bench_e2e.json for the speed plot")
    p.add_argument("--bench-model", default="llama-3.2-1b-shape")
    p.add_argument("--models", nargs="+", default=["ref-llama"])
    p.add_argument("--out", type=Path, default=Path("paper/figures"))
    args = p.parse_args(argv)
    rows = read_rows(args.paths)
    written = [size_vs_ppl(rows, m, args.out / f"size_vs_ppl_{m}.png") for m in args.models]
    if args.bench:
        written.append(speed_vs_ppl(rows, json.loads(args.bench.read_text()), args.models[0], args.bench_model,
                                    args.out / "speed_vs_ppl.png"))
    for w in written:
        print(f"wrote {w}")
    return written

