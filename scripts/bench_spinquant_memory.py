"""Benchmark: peak memory of SpinQuant rotation training, to size it for large models.

    python scripts/bench_spinquant_memory.py --out paper/results/bench_spinquant_memory.json

Builds a Llama-shaped model with random weights (memory does not depend on weight values) in bf16,
trains R1/R2 for a few steps at W16A4KV4 (the recipe before GPTQ) on one sequence of `--seq-len` random
tokens, and records the process's peak RSS (VmHWM) against the weight bytes, so that the cost can be
extrapolated: peak ≈ weights + rotated weight copy (kept for backward) + activations. With --steps 1
it also sums the bytes autograd saves for backward (storages other than the model's weights): the
part a GPU must hold on top of the weights, free of CPU allocator effects.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    from transformers import LlamaConfig, LlamaForCausalLM

    from spinquant import rotation
    from spinquant.quant import QuantConfig
    from spinquant.results import revision_for
    rev = revision_for(args.out)  # committed results only from a clean checkout: checked before measuring
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                      max_position_embeddings=args.seq_len, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    base = _rss("VmRSS")
    calib = torch.randint(0, args.vocab, (4, args.seq_len))
    weight_ptrs = {t.untyped_storage().data_ptr() for t in model.parameters()}
    saved: dict[int, int] = {}  # storage -> bytes of every tensor autograd keeps for backward (all steps)

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in weight_ptrs:
            saved[st.data_ptr()] = max(saved.get(st.data_ptr(), 0), st.nbytes())
        return t

    t = time.time()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        # one micro-batch of one sequence per step (the official per-device batch); memory does not grow with
        # the global batch, which accumulates gradients over micro-batches
        rotation.apply(model, {"name": "spinquant", "steps": args.steps, "batch_size": 1, "heldout": 1,
                               "progress": False, "train_quant": "auto"},
                       calib, target=QuantConfig.from_dict({"scheme": "W4A4KV4", "method": "gptq"}))
    peak = _rss("VmHWM")
    out = {"config": vars(args) | {"out": None}, "dtype": "bfloat16", "weight_bytes": weight_bytes,
           "rss_before_bytes": base, "peak_rss_bytes": peak, "training_overhead_bytes": peak - base,
           "overhead_vs_weights": (peak - base) / weight_bytes,
           # exact, device-independent: what autograd holds for one backward (steps=1), beyond the weights
           "saved_for_backward_bytes": sum(saved.values()) if args.steps == 1 else None,
           "train_s": time.time() - t, "git_rev": rev, "torch": torch.__version__}
    print(json.dumps(out, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
