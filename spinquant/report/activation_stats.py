"""Per-layer activation statistics of a model's linear inputs (outlier channels, kurtosis).

    python scripts/activation_stats.py --model ref-llama --out paper/results/activation_stats_ref-llama.json

Writes a JSON list (one entry per layer and input) and prints a Markdown table; see
spinquant/eval/activations.py for the definitions.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..data import calibration_batch
from ..eval.activations import activation_stats
from ..models import load
from ..results import revision_for
from ..writes import write_text


def markdown(model_name: str, stats: list[dict], git_rev: str | None = None) -> str:
    """The statistics as a Markdown table; `git_rev` (the commit they were measured at) is named under it."""
    lines = [f"**{model_name}** (inputs to each linear; kurtosis 3 = Gaussian)", "",
             "| layer | input | kurtosis | max abs | max/median channel max | top channels |", "|---|---|---:|---:|---:|---|"]
    for s in stats:
        lines.append(f"| {s['layer']} | {s['input']} | {s['kurtosis']:.1f} | {s['abs_max']:.2f} | "
                     f"{s['channel_max_ratio']:.1f} | {s['top_channels']} |")
    lines += ["", f"Measured at commit `{git_rev}`." if git_rev else "Commit not recorded."]
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ref-llama")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    p.add_argument("--md", type=Path, help="also write the Markdown table here")
    args = p.parse_args()
    rev = revision_for(args.out)  # committed results only from a clean checkout: checked before measuring
    model, tok = load(args.model)
    ids = calibration_batch(tok, "wikitext2-train", args.samples, args.seq_len, args.seed)
    stats = activation_stats(model, ids)
    text = markdown(args.model, stats, rev)
    print(text)
    if args.out:
        write_text(args.out, json.dumps({"model": args.model, "samples": args.samples, "seq_len": args.seq_len,
                                         "seed": args.seed, "git_rev": rev, "stats": stats}, indent=2), "statistics (--out)")
    if args.md:
        write_text(args.md, text, "statistics table (--md)")

