"""End-to-end benchmark of packed models: size on disk, peak RSS, prefill and decode tokens/s.

    python scripts/bench_e2e.py --out paper/results/bench_e2e.json            # both models, all schemes
    python scripts/bench_e2e.py --models ref-llama --schemes BF16 W4A8         # a quick subset

Models: `llama-3.2-1b-shape` (Llama-3.2-1B's public config, random weights: speed and size do not depend
on weight values) and `ref-llama` (the shipped reference model). For each scheme the parent process builds
the model, quantizes it (RTN, no clip search), packs it onto the CPU kernels and saves it
(`spinquant.export.save`; FP rows with `save_pretrained`); then a *fresh subprocess* loads the saved
folder, runs a 512-token prefill (batch 1) and decodes 128 tokens greedily, and reports its peak RSS (VmHWM:
everything the process ever held, Python and torch included). Every row of ours, FP included, decodes through
the lean decode path (`spinquant.decode.LeanDecoder`: static KV cache, fused q/k/v and gate/up, the one-token
attention kernel); `--decode-path hf` measures the model's own Hugging Face forward with its KV cache instead
(what the path saves). All schemes of a model are measured in one run; ratios are to BF16 from the same run.
The decode roofline is the measured memory bandwidth divided by the bytes of weights one decoded token reads
(see below). Checkpoints are built first and then measured in `--rounds` interleaved rounds
(every scheme once per round); each scheme reports its best prefill and decode speed, its highest peak RSS,
and every round's numbers.

llama.cpp (the engine a CPU user picks instead) is measured in the same rounds: the same model written as an F32
GGUF (spinquant.gguf_export; the random-weight 1B shape gets a synthetic byte-level BPE vocabulary of its size,
which only the file's metadata needs), quantized by llama.cpp's own quantizer to BF16 / Q8_0 / Q4_0 / Q4_K_M, and
run through llama-cpp-python in a fresh subprocess with the same threads, prompt and decode lengths (greedy
decoding; peak RSS as ours). Rows carry `engine` ("spinquant" / "llama.cpp") and llama.cpp's type names as
`scheme`; `vs_llama_cpp_q4_0` holds every row's ratios to llama.cpp Q4_0. The roofline of a row is the read
bandwidth this machine serves for a buffer of exactly the bytes one decoded token reads (measured, repeatedly
read: what part of it the last-level cache holds counts), over those bytes.
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
    # the int4 lm_head option: the head at int4 g32 (with int8 activations), the embedding its own int8 table
    "W4A8-lm4": ("bfloat16", {"scheme": "W4A8", "weight": _W4G32, **_LM8, "lm_head": _W4G32}, None),
    "W4A8+QuaRot": ("bfloat16", {"scheme": "W4A8", "weight": _W4G32, **_LM8}, "quarot"),
}
MODELS = ("llama-3.2-1b-shape", "ref-llama")
LLAMA_CPP = ("BF16", "Q8_0", "Q4_0", "Q4_K_M")  # llama.cpp's own quantizations of the same FP model


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
    """Bytes/s of a repeated streaming read of `gib` GiB (sum of a float32 tensor): with the bytes a decoded token
    reads, the bandwidth a decode loop can get, caches included."""
    x = torch.ones(max(1, int(gib * 2**30 / 4)))
    x.sum()
    best = float("inf")
    for _ in range(max(repeats, min(200, int(2**28 / (x.numel() * 4))))):  # small buffers: more tries, best kept
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


def child(folder: Path, packed: bool, dtype: str, prefill: int, decode: int, seed: int, path: str = "lean") -> dict:
    """Runs in a fresh process: load, prefill, decode (through spinquant.decode.LeanDecoder, or with path="hf" the
    model's own forward and KV cache); peak RSS of this process."""
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
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (1, prefill), generator=g)
    if path == "lean":
        from spinquant.decode import LeanDecoder
        dec = LeanDecoder(model, max_len=prefill + decode + 1)
        rss_loaded = peak_rss_bytes()
        dec.forward(prompt[:, :32])  # warm-up
        dec.reset()
        t = time.perf_counter()
        tok = dec.forward(prompt).argmax(-1, keepdim=True)
        prefill_s = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(decode):
            tok = dec.forward(tok).argmax(-1, keepdim=True)
        decode_s = time.perf_counter() - t
    else:
        def new_cache():  # K/V at their bit-width where the model quantizes them, plain 16-bit otherwise
            return packed_kv_cache(model) if packed else DynamicCache()
        rss_loaded = peak_rss_bytes()
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
    from spinquant.kernels import kernel_summary, native
    return {"kernels": kernel_summary(model), "native_simd": native.simd() if native.builds() else None,
            "prefill_tok_s": prefill / prefill_s,
            "decode_tok_s": decode / decode_s, "prefill_s": prefill_s,
            "decode_s": decode_s, "peak_rss_bytes": peak_rss_bytes(),
            "rss_after_load_bytes": rss_loaded, "decode_weight_bytes": _decode_weight_bytes(model),
            "threads": torch.get_num_threads(), "decode_path": path}


def synthetic_tokenizer(folder: Path, vocab_size: int) -> Path:
    """A byte-level BPE tokenizer of `vocab_size` tokens (256 bytes, one merge, fillers): GGUF metadata for a
    random-weight model that has no tokenizer; token ids are all the benchmark feeds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["ab"] = len(vocab)  # llama.cpp's BPE loader wants at least one merge
    for i in range(len(vocab), vocab_size):
        vocab[f"<t{i}>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(folder)
    return folder


def prepare_llama_cpp(model_name: str, folder: Path, threads: int) -> dict[str, dict]:
    """The model as an F32 GGUF, quantized by llama.cpp to each of LLAMA_CPP (files kept in `folder`)."""
    from spinquant.deploy import quantize_gguf
    from spinquant.gguf_export import export_gguf
    from spinquant.models.load import resolve_path
    folder.mkdir(parents=True, exist_ok=True)
    t = time.time()
    model = build(model_name, torch.float32)
    tokdir = resolve_path("ref-llama") if model_name == "ref-llama" else \
        synthetic_tokenizer(folder / "tokenizer", model.config.vocab_size)
    f32 = export_gguf(model, folder / "f32.gguf", tokdir, name=model_name, fp="F32")
    del model
    info = {}
    for kind in LLAMA_CPP:
        t1 = time.time()
        f = quantize_gguf(f32, folder / f"{kind}.gguf", kind, threads)
        info[kind] = {"size_bytes": f.stat().st_size, "build_s": time.time() - t1 + (t1 - t if kind == "BF16" else 0),
                      "kernels": {"llama.cpp": kind}}
    f32.unlink()
    return info


def gguf_decode_bytes(path: Path) -> int:
    """Bytes of the tensors one decoded token reads: all but the token embedding, which is read whole only when it
    doubles as the output matrix (tied)."""
    import gguf
    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors}
    tied = "output.weight" not in tensors
    return sum(b for n, b in tensors.items() if n != "token_embd.weight" or tied)


def child_llama_cpp(path: Path, prefill: int, decode: int, seed: int, threads: int) -> dict:
    """Runs in a fresh process: load the GGUF in llama.cpp, prefill, decode greedily; peak RSS of this process."""
    import llama_cpp
    import numpy as np
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=prefill + decode + 8, n_batch=prefill, n_ubatch=prefill,
                n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False)
    rss_loaded = peak_rss_bytes()
    vocab = llm.n_vocab()
    prompt = torch.randint(0, vocab, (prefill,), generator=torch.Generator().manual_seed(seed)).tolist()
    llm.eval(prompt[:32])  # warm-up
    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt)
    prefill_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(decode):  # greedy, as ours: the last position's logits straight from the context
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))
        llm.eval([int(logits.argmax())])
    decode_s = time.perf_counter() - t
    return {"kernels": {"llama.cpp": path.stem}, "prefill_tok_s": prefill / prefill_s, "decode_tok_s": decode / decode_s,
            "prefill_s": prefill_s, "decode_s": decode_s, "peak_rss_bytes": peak_rss_bytes(),
            "rss_after_load_bytes": rss_loaded, "decode_weight_bytes": gguf_decode_bytes(path), "threads": threads,
            "decode_path": "llama.cpp", "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode().strip()}


def _prepared(model_name: str, scheme: str, folder: Path) -> dict:
    """`prepare` once: a folder that already holds the checkpoint and its info.json (from --work-dir) is reused."""
    done = folder / "bench_info.json"
    if done.is_file():
        return json.loads(done.read_text())
    info = prepare(model_name, scheme, folder)
    done.write_text(json.dumps(info))
    return info


def _measure(folder: Path, engine: str, scheme: str, args) -> dict:
    """One measuring subprocess: ours (a saved folder) or llama.cpp (a type of LLAMA_CPP: folder/<scheme>.gguf)."""
    common = ["--prefill", str(args.prefill), "--decode", str(args.decode), "--seed", str(args.seed)]
    if engine == "llama.cpp":
        cmd = [sys.executable, __file__, "--child-gguf", str(folder / f"{scheme}.gguf"), "--threads",
               str(torch.get_num_threads()), *common]
    else:
        dtype_name, qcfg, _ = SCHEMES[scheme]
        cmd = [sys.executable, __file__, "--child", str(folder), "--dtype", dtype_name, "--decode-path",
               args.decode_path, *common] + (["--packed"] if qcfg is not None else [])
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
    p.add_argument("--llama-cpp", nargs="*", default=list(LLAMA_CPP), choices=list(LLAMA_CPP),
                   help="llama.cpp quantizations measured beside ours (none: --llama-cpp with no value)")
    p.add_argument("--decode-path", choices=("lean", "hf"), default="lean",
                   help="our rows decode through spinquant.decode.LeanDecoder (lean) or the model's own forward (hf)")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--child-gguf", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--packed", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    args = p.parse_args()
    rev = revision_for(args.out)  # committed results only from a clean checkout: checked before measuring
    if args.child:
        print(json.dumps(child(args.child, args.packed, args.dtype, args.prefill, args.decode, args.seed,
                               args.decode_path)))
        return
    if args.child_gguf:
        print(json.dumps(child_llama_cpp(args.child_gguf, args.prefill, args.decode, args.seed, args.threads)))
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
            info = {("spinquant", s): _prepared(model_name, s, d / s) for s in args.schemes}
            if args.llama_cpp:
                done = d / "llama.cpp" / "bench_info.json"
                if not done.is_file():
                    done.parent.mkdir(parents=True, exist_ok=True)
                    done.write_text(json.dumps(prepare_llama_cpp(model_name, d / "llama.cpp", torch.get_num_threads())))
                info.update({("llama.cpp", k): v for k, v in json.loads(done.read_text()).items()
                             if k in args.llama_cpp})
            if args.prepare_only:
                continue
            order = [("spinquant", s) for s in args.schemes] + [("llama.cpp", k) for k in args.llama_cpp]
            runs: dict[tuple, list[dict]] = {e: [] for e in order}
            for rnd in range(args.rounds):
                for engine, scheme in order:
                    folder = d / ("llama.cpp" if engine == "llama.cpp" else scheme)
                    runs[engine, scheme].append(_measure(folder, engine, scheme, args))
                    m = runs[engine, scheme][-1]
                    print(f"round {rnd}: {model_name:20s} {engine:9s} {scheme:12s} prefill {m['prefill_tok_s']:8.1f} "
                          f"tok/s  decode {m['decode_tok_s']:7.2f} tok/s  peak RSS {m['peak_rss_bytes'] / 2**20:8.1f} MiB",
                          flush=True)
        if args.prepare_only:
            continue
        for engine, scheme in order:
            ms = runs[engine, scheme]
            best = {k: max(m[k] for m in ms) for k in ("prefill_tok_s", "decode_tok_s")}
            wbytes = ms[-1]["decode_weight_bytes"]
            served = measure_bandwidth(wbytes / 2**30)  # what this machine serves for exactly these bytes
            row = {"model": model_name, "engine": engine, "scheme": scheme, **info[engine, scheme], **ms[-1], **best,
                   "peak_rss_bytes": max(m["peak_rss_bytes"] for m in ms),
                   "rounds": [{k: m[k] for k in ("prefill_tok_s", "decode_tok_s", "peak_rss_bytes")} for m in ms],
                   "machine": machine, "git_rev": rev, "torch": torch.__version__, "mem_bandwidth_bytes_s": bw,
                   "served_bandwidth_bytes_s": served, "roofline_decode_tok_s": served / wbytes}
            row["roofline_frac"] = row["decode_tok_s"] / row["roofline_decode_tok_s"]
            rows.append(row)
            print(f"{model_name:20s} {engine:9s} {scheme:12s} size {row['size_bytes'] / 2**20:9.1f} MiB  peak RSS "
                  f"{row['peak_rss_bytes'] / 2**20:8.1f} MiB  prefill {row['prefill_tok_s']:8.1f} tok/s  decode "
                  f"{row['decode_tok_s']:7.2f} tok/s  ({100 * row['roofline_frac']:.0f}% of the bandwidth roofline)",
                  flush=True)
    if args.prepare_only:
        return
    keys = ("size_bytes", "peak_rss_bytes", "prefill_tok_s", "decode_tok_s")
    for model_name in args.models:
        base = next(r for r in rows if r["model"] == model_name and r["scheme"] == "BF16" and r["engine"] == "spinquant")
        q4 = next((r for r in rows if r["model"] == model_name and r["scheme"] == "Q4_0" and r["engine"] == "llama.cpp"),
                  None)
        for r in rows:
            if r["model"] == model_name:
                r["vs_bf16"] = {k: r[k] / base[k] for k in keys}
                r["vs_llama_cpp_q4_0"] = None if q4 is None else {k: r[k] / q4[k] for k in keys}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
