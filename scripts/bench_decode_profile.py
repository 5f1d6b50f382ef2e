"""Where a decoded token's time goes: the model's own forward (hf) against the lean decode path, per token.

    python scripts/bench_decode_profile.py --folder CKPT --out paper/results/decode_profile.json

CKPT is a packed folder (`spinquant export`, or bench_e2e's --work-dir checkpoints). For each path, in this process:
load, prefill `--prefill` random tokens, time `--tokens` greedy decode steps (wall ms/token), then the same number
of steps again with every packed matmul and the attention kernel timed by role (q / k / v / o, the fused q/k/v and
gate/up, down, lm_head: from the layer shapes) and torch's profiler on (self time of torch's ops per token).
The instrumented pass is slower than the timed one; its shares, not its sum, are the breakdown.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spinquant.results import revision_for  # noqa: E402


def _roles(cfg) -> dict[tuple[int, int], str]:
    """(in, out) features -> the role of a linear of this model."""
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    d = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * d, (cfg.num_key_value_heads or cfg.num_attention_heads) * d
    out: dict[tuple[int, int], str] = {}
    for shape, name in (((h, q), "q"), ((h, kv), "k / v"), ((q, h), "o"), ((h, q + 2 * kv), "q/k/v fused"),
                        ((h, i), "gate / up"), ((h, 2 * i), "gate+up fused"), ((i, h), "down"), ((h, v), "lm_head")):
        out[shape] = f"{out[shape]} / {name}" if shape in out else name  # q and o share a shape when q = hidden
    return out


def profile_path(folder: Path, path: str, prefill: int, tokens: int, seed: int) -> dict:
    from spinquant import export
    from spinquant.kernels import LAYOUTS, native, packed_kv_cache
    model, _ = export.load(folder)
    roles = _roles(model.config)
    prompt = torch.randint(0, model.config.vocab_size, (1, prefill), generator=torch.Generator().manual_seed(seed))
    if path == "lean":
        from spinquant.decode import LeanDecoder
        dec = LeanDecoder(model, max_len=prefill + 2 * tokens + 1)
        tok = dec.forward(prompt).argmax(-1, keepdim=True)

        def step(t):
            return dec.forward(t).argmax(-1, keepdim=True)
    else:
        cache = packed_kv_cache(model)
        with torch.inference_mode():
            tok = model(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)

        def step(t):
            with torch.inference_mode():
                return model(t, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(tokens):
        tok = step(tok)
    wall = (time.perf_counter() - t0) / tokens

    spent = collections.defaultdict(float)  # the instrumented pass: matmuls by role, the attention kernel
    originals = {cls: cls.matmul for cls in LAYOUTS.values()} | {native: native.attend_one_token}

    def timer(fn, key):
        def timed(*a, **k):
            t = time.perf_counter()
            y = fn(*a, **k)
            spent[key(a)] += time.perf_counter() - t
            return y
        return timed

    def role(a):
        return roles.get((a[0].in_features, a[0].out_features), f"{a[0].in_features}x{a[0].out_features}")
    for cls in LAYOUTS.values():
        cls.matmul = timer(originals[cls], role)
    native.attend_one_token = timer(originals[native], lambda a: "attention (C kernel)")
    try:
        from torch.profiler import profile
        t0 = time.perf_counter()
        with profile() as prof:
            for _ in range(tokens):
                tok = step(tok)
        instrumented = (time.perf_counter() - t0) / tokens
    finally:
        for cls in LAYOUTS.values():
            cls.matmul = originals[cls]
        native.attend_one_token = originals[native]
    ops = sorted(((e.key, e.self_cpu_time_total / 1e3 / tokens) for e in prof.key_averages()), key=lambda kv: -kv[1])
    return {"ms_per_token": 1e3 * wall, "tok_s": 1 / wall, "instrumented_ms_per_token": 1e3 * instrumented,
            "matmul_ms_per_token": {k: 1e3 * v / tokens for k, v in sorted(spent.items(), key=lambda kv: -kv[1])},
            "torch_ops_self_ms_per_token": {k: round(v, 4) for k, v in ops[:15]}}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", type=Path, required=True)
    p.add_argument("--paths", nargs="*", default=["hf", "lean"], choices=["hf", "lean"])
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    rev = revision_for(args.out)
    torch.set_num_threads(args.threads)
    out = {"folder": args.folder.name, "git_rev": rev, "threads": args.threads, "torch": torch.__version__,
           "prefill": args.prefill, "tokens": args.tokens, "paths": {}}
    for path in args.paths:
        r = out["paths"][path] = profile_path(args.folder, path, args.prefill, args.tokens, args.seed)
        print(f"{path:5s} {r['ms_per_token']:7.2f} ms/token ({r['tok_s']:.1f} tok/s); matmuls "
              + ", ".join(f"{k} {v:.2f}" for k, v in r["matmul_ms_per_token"].items()), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1))
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
