"""End-to-end benchmark of packed models: size on disk, peak RSS, prefill and decode tokens/s.

    python scripts/bench_e2e.py --out paper/results/bench_e2e.json            # both models, all schemes
    python scripts/bench_e2e.py --models ref-llama --schemes BF16 W4A8         # a quick subset

Models: `llama-3.2-1b-shape` (Llama-3.2-1B's public config, random weights: speed and size do not depend
on weight values) and `ref-llama` (the shipped reference model). For each scheme the parent process builds
the model, quantizes it (RTN, no clip search), packs it onto the CPU kernels and saves it
(`spinquant.export.save`; FP rows with `save_pretrained`); then a *fresh subprocess* loads the saved
folder, runs a 512-token prefill (batch 1) and decodes 128 tokens greedily with a KV cache, and reports
its peak RSS (VmHWM: everything the process ever held, Python and torch included). All schemes of a
model are measured in one run; ratios are to BF16 from the same run. The decode roofline is the
measured memory bandwidth (a streaming read of a 1 GiB tensor) divided by the bytes of weights one
decoded token reads. FP rows run with the same attention implementation as the packed ones (`spinquant`:
sdpa, with a packed-query route for single-token GQA decoding that torch's bf16 CPU sdpa runs ~30x slower),
so the ratios measure the linear layers. Checkpoints are built first and then measured in `--rounds` interleaved rounds
(every scheme once per round); each scheme reports its best prefill and decode speed, its highest peak RSS,
and every round's numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spinquant.results import revision_for  # noqa: E402

LLAMA_32_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                   rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
                   rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                 "original_max_position_embeddings": 8192, "rope_type": "llama3"})

_A8 = {"bits": 8, "symmetric": False, "granularity": "token", "dynamic": True}
_LM8 = {"embed": {"bits": 8}, "lm_head": {"bits": 8}, "lm_head_act": _A8}  # Meta's recipe: int8 embedding/lm_head
_W4G32 = {"bits": 4, "granularity": "group", "group_size": 32, "clip_search": "none"}
SCHEMES = {  # name -> (dtype, quant config or None, rotation)
    "FP32": ("float32", None, None),
    "BF16": ("bfloat16", None, None),
    "W8A8": ("bfloat16", {"scheme": "W8A8", **_LM8}, None),
    "W4A16": ("bfloat16", {"scheme": "W4A16", "weight": _W4G32, **_LM8}, None),
    "W4A8": ("bfloat16", {"scheme": "W4A8", "weight": _W4G32, **_LM8}, None),
    "W4A8+QuaRot": ("bfloat16", {"scheme": "W4A8", "weight": _W4G32, **_LM8}, "quarot"),
}
MODELS = ("llama-3.2-1b-shape", "ref-llama")


def build(model_name: str, dtype: torch.dtype, seed: int = 0):
    if model_name == "ref-llama":
        from spinquant.models import load
        return load("ref-llama", dtype=dtype)[0]
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(**LLAMA_32_1B, attn_implementation="sdpa")
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


def prepare(model_name: str, scheme: str, folder: Path) -> dict:
    """Build, (rotate, quantize, pack) and save one checkpoint; returns what the parent knows about it."""
    from spinquant import export, rotation
    from spinquant.kernels import kernel_summary
    from spinquant.quant import QuantConfig, quantize_
    dtype_name, qcfg, rot = SCHEMES[scheme]
    dtype = getattr(torch, dtype_name)
    t = time.time()
    model = build(model_name, torch.float32 if rot else dtype)
    if rot:  # fusion is exact in float32 / float64; the rotated model then runs in bf16
        rotation.apply(model, {"name": rot, "seed": 0})
    if qcfg is None:
        model.save_pretrained(folder, safe_serialization=True)
        kernels = {}
    else:
        quantize_(model, QuantConfig.from_dict(qcfg), progress=False)
        export.save(model, folder)  # packs in place (bf16 compute)
        kernels = kernel_summary(model)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return {"size_bytes": size, "build_s": time.time() - t, "kernels": kernels}


def measure_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of a streaming read (sum of a float32 tensor larger than the caches)."""
    x = torch.ones(int(gib * 2**30 / 4))
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def _decode_weight_bytes(model) -> int:
    """Bytes of weights one decoded token reads: every linear (packed buffers or dense weights) + lm_head."""
    from spinquant.kernels import PackedLinear
    total, seen = 0, set()
    for m in model.modules():
        if isinstance(m, PackedLinear):
            tensors = m.weight_buffers()
        elif isinstance(m, torch.nn.Linear):
            tensors = [m.weight]
        else:
            continue
        for b in tensors:
            if b is not None and b.data_ptr() not in seen:
                seen.add(b.data_ptr())
                total += b.numel() * b.element_size()
    return total


def peak_rss_bytes() -> int:
    """This process's RSS high-water mark (VmHWM: per address space, so a fresh exec starts from zero;
    ru_maxrss would carry the parent's peak across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # non-Linux fallback


def child(folder: Path, packed: bool, dtype: str, prefill: int, decode: int, seed: int) -> dict:
    """Runs in a fresh process: load, prefill, decode; peak RSS of this process."""
    from transformers import AutoModelForCausalLM, DynamicCache
    if packed:
        from spinquant import export
        from spinquant.kernels.kv_cache import packed_kv_cache
        model, _ = export.load(folder)
    else:
        import spinquant.models.attention  # noqa: F401  (registers the attention the packed models use)
        # the same attention code as the packed models, so that the ratios measure the linear kernels
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype),
                                                     attn_implementation="spinquant").eval()

    def new_cache():  # K/V at their bit-width where the model quantizes them, plain 16-bit otherwise
        return packed_kv_cache(model) if packed else DynamicCache()
    rss_loaded = peak_rss_bytes()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (1, prefill), generator=g)
    with torch.inference_mode():
        model(prompt[:, :32], past_key_values=new_cache(), use_cache=True, logits_to_keep=1)  # warm-up
        cache = new_cache()
        t = time.perf_counter()
        out = model(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
        prefill_s = time.perf_counter() - t
        tok = out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(decode):
            out = model(tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
        decode_s = time.perf_counter() - t
    from spinquant.kernels import kernel_summary
    return {"kernels": kernel_summary(model), "prefill_tok_s": prefill / prefill_s,
            "decode_tok_s": decode / decode_s, "prefill_s": prefill_s,
            "decode_s": decode_s, "peak_rss_bytes": peak_rss_bytes(),
            "rss_after_load_bytes": rss_loaded, "decode_weight_bytes": _decode_weight_bytes(model),
            "threads": torch.get_num_threads()}


def _prepared(model_name: str, scheme: str, folder: Path) -> dict:
    """`prepare` once: a folder that already holds the checkpoint and its info.json (from --work-dir) is reused."""
    done = folder / "bench_info.json"
    if done.is_file():
        return json.loads(done.read_text())
    info = prepare(model_name, scheme, folder)
    done.write_text(json.dumps(info))
    return info


def _measure(folder: Path, scheme: str, args) -> dict:
    dtype_name, qcfg, _ = SCHEMES[scheme]
    cmd = [sys.executable, __file__, "--child", str(folder), "--dtype", dtype_name, "--prefill", str(args.prefill),
           "--decode", str(args.decode), "--seed", str(args.seed)] + (["--packed"] if qcfg is not None else [])
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"{folder} {scheme}: measuring subprocess failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    p.add_argument("--schemes", nargs="*", default=list(SCHEMES), choices=list(SCHEMES))
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--decode", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2, help="measuring rounds over all schemes; best speed per scheme")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    p.add_argument("--work-dir", type=Path, help="keep the built checkpoints here and reuse them on the next run")
    p.add_argument("--prepare-only", action="store_true", help="build (and keep, with --work-dir) the checkpoints only")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--packed", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    args = p.parse_args()
    rev = revision_for(args.out)  # committed results only from a clean checkout: checked before measuring
    if args.child:
        print(json.dumps(child(args.child, args.packed, args.dtype, args.prefill, args.decode, args.seed)))
        return
    if "BF16" not in args.schemes:
        p.error("BF16 must be among --schemes: every ratio is to BF16 measured in the same run")
    bw = measure_bandwidth()
    print(f"memory bandwidth (streaming read): {bw / 1e9:.1f} GB/s, {torch.get_num_threads()} threads")
    rows = []
    machine = " ".join(x for x in (platform.machine(), platform.processor(), f"{os.cpu_count()} cpus") if x)
    for model_name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            d = args.work_dir / model_name if args.work_dir else Path(tmp)
            # build every checkpoint first, then measure the schemes in interleaved rounds: this machine's speed
            # drifts over minutes, so each scheme keeps its best round and every round sees every scheme
            info = {s: _prepared(model_name, s, d / s) for s in args.schemes}
            if args.prepare_only:
                continue
            runs: dict[str, list[dict]] = {s: [] for s in args.schemes}
            for rnd in range(args.rounds):
                for scheme in args.schemes:
                    runs[scheme].append(_measure(d / scheme, scheme, args))
                    m = runs[scheme][-1]
                    print(f"round {rnd}: {model_name:20s} {scheme:12s} prefill {m['prefill_tok_s']:8.1f} tok/s  decode "
                          f"{m['decode_tok_s']:7.2f} tok/s  peak RSS {m['peak_rss_bytes'] / 2**20:8.1f} MiB", flush=True)
        if args.prepare_only:
            continue
        for scheme in args.schemes:
            ms = runs[scheme]
            best = {k: max(m[k] for m in ms) for k in ("prefill_tok_s", "decode_tok_s")}
            row = {"model": model_name, "scheme": scheme, **info[scheme], **ms[-1], **best,
                   "peak_rss_bytes": max(m["peak_rss_bytes"] for m in ms),
                   "rounds": [{k: m[k] for k in ("prefill_tok_s", "decode_tok_s", "peak_rss_bytes")} for m in ms],
                   "machine": machine, "git_rev": rev, "torch": torch.__version__, "mem_bandwidth_bytes_s": bw,
                   "roofline_decode_tok_s": bw / ms[-1]["decode_weight_bytes"]}
            row["roofline_frac"] = row["decode_tok_s"] / row["roofline_decode_tok_s"]
            rows.append(row)
            print(f"{model_name:20s} {scheme:12s} size {row['size_bytes'] / 2**20:9.1f} MiB  peak RSS "
                  f"{row['peak_rss_bytes'] / 2**20:8.1f} MiB  prefill {row['prefill_tok_s']:8.1f} tok/s  decode "
                  f"{row['decode_tok_s']:7.2f} tok/s  ({100 * row['roofline_frac']:.0f}% of the bandwidth roofline)",
                  flush=True)
    if args.prepare_only:
        return
    for model_name in args.models:
        base = next(r for r in rows if r["model"] == model_name and r["scheme"] == "BF16")
        for r in rows:
            if r["model"] == model_name:
                r["vs_bf16"] = {k: r[k] / base[k] for k in ("size_bytes", "peak_rss_bytes", "prefill_tok_s",
                                                            "decode_tok_s")}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
