"""Benchmark: the training cost of QAT against plain fine-tuning of the same model.

    python scripts/bench_qat.py --model ref-llama --out paper/results/bench_qat.json

Each mode runs in a fresh subprocess (so peak RSS is its own): `finetune` (FP model, decoder linear
weights trainable), `qat_full` (same weights trainable through fake quant), `qat_lora` (frozen fake-quant
base + rank-16 adapters). Same batch, optimizer and loop (qat.train); throughput = tokens/s over the
timed steps after warm-up. Writes one JSON with absolute numbers and ratios to `finetune`.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODES = ("finetune", "qat_full", "qat_lora")


def worker(args) -> dict:
    import psutil

    from spinquant.data import tokenize_dataset
    from spinquant.models import get_adapter, load
    from spinquant.qat import QATConfig, TrainConfig, prepare, train
    from spinquant.quant import QuantConfig
    torch.manual_seed(0)
    model, tok = load(args.model)
    tokens = tokenize_dataset(tok, "wikitext2-train", add_bos=False)[0]
    quant = QuantConfig.from_dict({"scheme": args.scheme, "group_fallback": args.group_fallback})
    if args.mode == "finetune":
        model.requires_grad_(False)
        a = get_adapter(model)
        for layer in a.decoder_layers(model):
            for lin in a.layer_linears(layer).values():
                lin.weight.requires_grad_(True)
    else:
        prepare(model, quant, QATConfig(mode="full" if args.mode == "qat_full" else "lora", lora_rank=16))
    cfg = dict(batch_size=args.batch_size, micro_batch_size=args.batch_size, seq_len=args.seq_len, lr=1e-5,
               warmup=1, progress=False, wandb_mode="disabled", mixed_precision="no")
    train(model, tokens, TrainConfig(steps=args.warmup, **cfg))  # warm-up (allocator, caches)
    t = time.time()
    _, st = train(model, tokens, TrainConfig(steps=args.steps, **cfg))
    wall = time.time() - t
    return {"mode": args.mode, "tokens_per_s": args.steps * args.batch_size * args.seq_len / wall,
            "trainable_params": st["trainable_params"], "peak_rss_bytes": psutil.Process().memory_info().rss,
            "peak_rss_hwm_bytes": _hwm()}


def _hwm() -> int | None:
    """Peak resident set size of this process (VmHWM), Linux only."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ref-llama")
    p.add_argument("--scheme", default="W4A8")
    p.add_argument("--group-fallback", default="error", choices=["error", "channel"])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # internal: one measurement
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.mode:
        print("RESULT " + json.dumps(worker(args)))
        return
    from spinquant.results import revision_for
    rev = revision_for(args.out)  # committed results only from a clean checkout: checked before measuring
    rows = []
    for mode in MODES:
        cmd = [sys.executable, __file__, "--mode", mode] + [a for a in sys.argv[1:] if a != "--out" and not
                                                             (args.out and a == str(args.out))]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
        out = proc.stdout
        rows.append(json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:]))
        print(rows[-1], flush=True)
    base = rows[0]
    for r in rows:
        r["throughput_vs_finetune"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["peak_mem_vs_finetune"] = r["peak_rss_hwm_bytes"] / base["peak_rss_hwm_bytes"]
    result = {"model": args.model, "scheme": args.scheme, "batch": [args.batch_size, args.seq_len], "steps": args.steps,
              "rows": rows, "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "torch": torch.__version__, "git_rev": rev}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
