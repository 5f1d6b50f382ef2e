"""Exported models inside their runtime, measured with our protocol: llama.cpp through llama-cpp-python, ExecuTorch
programs through executorch's Python runtime.

`LlamaCppLM(path)` and `ExecuTorchLM(path)` are logits functions x [b, L] -> [b, L, vocab] that
`spinquant.eval.perplexity_of_ids` scores exactly as it scores our models (same token stream, same windows, same
NLL sums), so the two perplexities differ only by what each runtime computes. `quantize_gguf` runs llama.cpp's own
quantizer (the baseline a llama.cpp user picks) and `llama_cpp_speed` times prefill and decode in the same process.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

FTYPES = {"F16": 1, "Q4_0": 2, "Q8_0": 7, "Q4_K_M": 15, "BF16": 32}  # llama.h LLAMA_FTYPE_MOSTLY_*


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise ImportError("running GGUF files needs llama.cpp's Python bindings: pip install 'spinquant[llama]' "
                          "(built from source with cmake)") from None
    return llama_cpp


class LlamaCppLM:
    """A GGUF file loaded in llama.cpp; calling it on token ids [b, L] returns float32 logits [b, L, vocab], each
    row evaluated from an empty context."""

    def __init__(self, path, n_ctx: int, n_threads: int = 1):
        llama_cpp = _llama_cpp()
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                   n_threads=n_threads, n_threads_batch=n_threads, logits_all=True, verbose=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for row in x.tolist():
            self.llm.reset()
            self.llm.eval(row)
            out.append(torch.from_numpy(np.array(self.llm.scores[: len(row)], dtype=np.float32)))
        return torch.stack(out)

    def close(self) -> None:
        self.llm.close()


def quantize_gguf(src, dst, ftype: str, n_threads: int = 1) -> Path:
    """llama.cpp's own quantization of the GGUF file `src` (F32/F16) into `dst` at `ftype` (Q4_0, Q4_K_M, Q8_0)."""
    llama_cpp = _llama_cpp()
    if ftype not in FTYPES:
        raise ValueError(f"unknown llama.cpp file type {ftype!r}; known: {', '.join(FTYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.nthread = n_threads
    dst = Path(dst)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {ftype} (return code {rc})")
    return dst


def llama_cpp_speed(path, n_threads: int, vocab: int, prefill: int = 512, decode: int = 64, seed: int = 0) -> dict:
    """Prefill (one batch of `prefill` tokens) and decode (`decode` single tokens after it) throughput, tok/s,
    best of three after a warm-up, as llama-bench measures them."""
    llama_cpp = _llama_cpp()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=prefill + decode, n_batch=prefill, n_ubatch=prefill,
                          n_threads=n_threads, n_threads_batch=n_threads, logits_all=False, verbose=False)
    ids = torch.randint(0, vocab, (prefill + decode,), generator=torch.Generator().manual_seed(seed)).tolist()
    best_p = best_d = float("inf")
    try:
        llm.eval(ids[:16])
        for _ in range(3):
            llm.reset()
            t = time.perf_counter()
            llm.eval(ids[:prefill])
            best_p = min(best_p, time.perf_counter() - t)
            t = time.perf_counter()
            for tok in ids[prefill:]:
                llm.eval([tok])
            best_d = min(best_d, time.perf_counter() - t)
    finally:
        llm.close()
    return {"prefill_tok_s": prefill / best_p, "decode_tok_s": decode / best_d}


class ExecuTorchLM:
    """A .pte (spinquant.et_export) loaded in ExecuTorch's runtime on `n_threads` threads; calling it on token ids
    [b, L] returns float32 logits [b, L, vocab], each row evaluated from position 0 (the static cache is overwritten
    from the start and masked past the row)."""

    def __init__(self, path, n_threads: int = 1):
        from .et_export import executorch_api
        executorch_api()
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
        from executorch.runtime import Runtime
        _unsafe_reset_threadpool(n_threads)  # XNNPACK's pool (executorch pinned in the lock; tested)
        self.program = Runtime.get().load_program(str(path))
        self.method = self.program.load_method("forward")

    def step(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Logits [1, L, vocab] of ids [1, L] placed at positions start..start+L-1 of the cache."""
        pos = torch.arange(start, start + ids.shape[1], dtype=torch.long)
        return self.method.execute([ids.to(torch.long).contiguous(), pos])[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.step(row[None], 0) for row in x]).float()

    def speed(self, vocab: int, prefill: int = 512, decode: int = 64, seed: int = 0) -> dict:
        """Prefill (one call of `prefill` tokens) and decode (`decode` single-token calls after it) throughput,
        tok/s, best of three after a warm-up (as `llama_cpp_speed`)."""
        ids = torch.randint(0, vocab, (1, prefill + decode), generator=torch.Generator().manual_seed(seed))
        self.step(ids[:, :16], 0)
        best_p = best_d = math.inf
        for _ in range(3):
            t = time.perf_counter()
            self.step(ids[:, :prefill], 0)
            best_p = min(best_p, time.perf_counter() - t)
            t = time.perf_counter()
            for i in range(prefill, prefill + decode):
                self.step(ids[:, i:i + 1], i)
            best_d = min(best_d, time.perf_counter() - t)
        return {"prefill_tok_s": prefill / best_p, "decode_tok_s": decode / best_d}


# ---- the deploy table: llama.cpp's own quantizations beside ours, one row per (model, file) ----------------------

# (quantizer label, GGUF format, Hydra overrides of our run): what our rows export
OURS = [("rtn", "Q4_0", ["quant=gguf_q4_0"]),
        ("gptq", "Q4_0", ["quant=gguf_q4_0_gptq"]),
        ("spinquant-offline+gptq", "Q4_0", ["quant=gguf_q4_0_gptq", "rotation=spinquant_offline"]),
        ("qat-full", "Q4_0", ["quant=gguf_q4_0", "qat=full", "qat.scales=fixed", "qat.train.steps=100"]),
        ("rtn", "Q8_0", ["quant=gguf_q8_0"]),
        ("gptq", "Q8_0", ["quant=gguf_q8_0_gptq"])]
LLAMA_CPP = ["Q8_0", "Q4_0", "Q4_K_M"]
# ExecuTorch programs (XNNPACK): Meta's W4A8 recipe (quant=executorch_w4a8), FP32 for the runtime's own baseline
ET_FORMAT = "XNNPACK-W4A8"
OURS_ET = [("rtn", ["quant=executorch_w4a8"]),
           ("gptq", ["quant=executorch_w4a8_gptq"]),
           ("quarot-r124+gptq", ["quant=executorch_w4a8_gptq", "rotation=quarot", "rotation.r3=false"]),
           ("qat-full", ["quant=executorch_w4a8", "qat=full", "qat.scales=fixed", "qat.train.steps=100"])]


def measure(lm, texts: dict, seq_len: int, max_windows: int | None, reference=None, ours: dict | None = None,
            desc: str = "runtime") -> dict:
    """One file inside its runtime (`lm`, a logits callable) on each text of `texts` {dataset: ids [1, n]}, with our
    windows: perplexity, per-window NLLs and, against `reference` (our FP model), KL divergence and top-1 agreement.
    `ours` {dataset: PerplexityResult}: the same model in our framework (fake-quant) on the same windows, beside it.
    Returns {dataset: entry} as the deploy rows store it under "per_dataset"."""
    from .eval.perplexity import perplexity_of_ids
    out = {}
    for ds, ids in texts.items():
        r = perplexity_of_ids(lm, ids, seq_len, batch_size=1, max_windows=max_windows, progress=False,
                              desc=f"{desc} {ds}", reference=reference)
        o = (ours or {}).get(ds)
        out[ds] = {"ppl_runtime": r.ppl, "ppl_framework": None if o is None else o.ppl, "windows": r.windows,
                   "tokens_scored": r.tokens_scored, "runtime_window_nll": r.window_nll,
                   "framework_window_nll": None if o is None else o.window_nll,
                   "kld_runtime": None if r.kld is None else r.kld.to_dict(),
                   "kld_framework": None if o is None or o.kld is None else o.kld.to_dict()}
    return out


# compressed-tensors checkpoints reloaded in transformers (what a transformers / vLLM user loads): (quantizer,
# format, overrides); the format holds weight-only symmetric int4 and W8A8 (spinquant.ct_export)
OURS_CT = [("rtn", "CT-W4A16-g128", ["quant=w4a16_g128"]),
           ("gptq", "CT-W4A16-g128", ["quant=w4a16_g128_gptq"]),
           ("rtn", "CT-W8A8", ["quant=w8a8"])]


@torch.no_grad()
def transformers_speed(model, vocab: int, prefill: int = 512, decode: int = 64, seed: int = 0) -> dict:
    """Prefill (one forward of `prefill` tokens) and decode (`decode` single tokens with the KV cache) throughput of a
    transformers model, tok/s, best of three after a warm-up (as `llama_cpp_speed`)."""
    ids = torch.randint(0, vocab, (1, prefill + decode), generator=torch.Generator().manual_seed(seed))
    model(ids[:, :16])
    best_p = best_d = math.inf
    for _ in range(3):
        t = time.perf_counter()
        past = model(ids[:, :prefill], use_cache=True).past_key_values
        best_p = min(best_p, time.perf_counter() - t)
        t = time.perf_counter()
        for i in range(prefill, prefill + decode):
            past = model(ids[:, i:i + 1], past_key_values=past, use_cache=True).past_key_values
        best_d = min(best_d, time.perf_counter() - t)
    return {"prefill_tok_s": prefill / best_p, "decode_tok_s": decode / best_d}


def transformers_deploy_row(model_name: str, fmt: str, quantizer: str, folder, texts: dict, seq_len: int, vocab: int,
                            threads: int, max_windows: int | None, ours: dict | None = None, extra: dict | None = None,
                            reference=None) -> dict:
    """Measure one compressed-tensors checkpoint reloaded by transformers (`from_pretrained`, as a user loads it) on
    `texts` {dataset: ids} with our windows (see `measure`), its size and prefill/decode speed."""
    from transformers import AutoModelForCausalLM
    lm = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    per = measure(lm, texts, seq_len, max_windows, reference, ours, f"transformers {fmt}")
    speed = transformers_speed(lm, vocab, prefill=min(512, seq_len - 64), decode=64)
    return _row(model_name, "transformers", fmt, quantizer, folder, per, seq_len, speed, threads, extra)


def _size(path) -> int:
    """Bytes of a file, or of every file in a folder (a checkpoint)."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def deploy_row(model_name: str, fmt: str, quantizer: str, gguf_path, texts: dict, seq_len: int, vocab: int,
               threads: int, max_windows: int | None, ours: dict | None = None, extra: dict | None = None,
               reference=None) -> dict:
    """Measure one GGUF file in llama.cpp on `texts` {dataset: ids} with our windows (see `measure`), its size and
    prefill/decode speed."""
    lm = LlamaCppLM(gguf_path, n_ctx=seq_len, n_threads=threads)
    try:
        per = measure(lm, texts, seq_len, max_windows, reference, ours, f"llama.cpp {fmt}")
    finally:
        lm.close()
    speed = llama_cpp_speed(gguf_path, threads, vocab, prefill=min(512, seq_len), decode=64)
    return _row(model_name, "llama.cpp", fmt, quantizer, gguf_path, per, seq_len, speed, threads, extra)


def _row(model_name, runtime, fmt, quantizer, path, per, seq_len, speed, threads, extra) -> dict:
    """One deploy-table row: per dataset the runtime's perplexity and KLD beside ours (same windows), size, speed.
    The first dataset's numbers are also at the top level (`dataset`, `ppl_runtime`, ...: the rows' original form)."""
    first = next(iter(per))
    top = {k: per[first][k] for k in ("ppl_runtime", "ppl_framework", "windows", "tokens_scored",
                                      "runtime_window_nll", "framework_window_nll")}
    row = {"model": model_name, "runtime": runtime, "format": fmt, "quantizer": quantizer, "dataset": first, **top,
           "seq_len": seq_len, "file_bytes": _size(path), **speed, "threads": threads,
           "per_dataset": per}
    return {**row, **(extra or {})}


def et_deploy_row(model_name: str, fmt: str, quantizer: str, pte_path, texts: dict, seq_len: int, vocab: int,
                  threads: int, max_windows: int | None, ours: dict | None = None, extra: dict | None = None,
                  reference=None) -> dict:
    """Measure one .pte in ExecuTorch's runtime on `texts` {dataset: ids} with our windows (see `measure`), its size
    and prefill/decode speed."""
    lm = ExecuTorchLM(pte_path, n_threads=threads)
    per = measure(lm, texts, seq_len, max_windows, reference, ours, f"executorch {fmt}")
    speed = lm.speed(vocab, prefill=min(512, seq_len - 64), decode=64)
    return _row(model_name, "executorch", fmt, quantizer, pte_path, per, seq_len, speed, threads, extra)
