"""The deploy table (paper/deploy_table.md): exported files measured inside their runtime (GGUF in llama.cpp, .pte
programs in ExecuTorch), one row per (model, file), one table per (model, runtime)."""
from __future__ import annotations

import json
from pathlib import Path

from .tables import ADAPTED, ADAPTED_NOTE, model_note, models_of, reduced_recipe_note

FORMAT_ORDER = {"F32": 0, "FP32": 0, "Q8_0": 1, "Q4_K_M": 2, "Q4_0": 3, "XNNPACK-W4A8": 4, "CT-W8A8": 5,
                "CT-W4A16-g128": 6}
QUANTIZER_ORDER = {"none": 0, "llama.cpp": 1, "rtn": 2, "gptq": 3, "spinquant-offline+gptq": 4,
                   "quarot-r124+gptq": 4, "qat-full": 5}
RUNTIME_ORDER = {"llama.cpp": 0, "executorch": 1, "transformers": 2}
NOTES = {"llama.cpp": "", "executorch": " XNNPACK delegate; prefill is 448 tokens (the program's static cache holds the "
                                      "eval length, 512) and decode 64.",
         "transformers": " compressed-tensors checkpoints reloaded by `AutoModelForCausalLM.from_pretrained` (the "
                         "compressed-tensors package decompresses them: the speed is transformers' dense CPU path); "
                         "prefill 448 tokens, decode 64 with the KV cache."}


def read_deploy_rows(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))]



def _qat_recipe(row) -> str:
    """'100 steps' or '8 steps of 4 sequences': a QAT row's training length, from the overrides it records."""
    o = dict(x.split("=", 1) for x in row.get("overrides") or [] if "=" in x)
    steps = o.get("qat.train.steps", "100")
    return f"{steps} steps" + (f" of {o['qat.train.batch_size']} sequences" if "qat.train.batch_size" in o else "")

def render_deploy(rows: list[dict]) -> str:
    out = []
    for model in models_of(rows):
        runtimes = sorted({r["runtime"] for r in rows if r["model"] == model}, key=lambda k: RUNTIME_ORDER.get(k, 9))
        for i, runtime in enumerate(runtimes):
            text = _render_one(model, runtime, [r for r in rows if r["model"] == model and r["runtime"] == runtime])
            out.append(text + ("\n" + "\n".join(model_note(model)) if i == len(runtimes) - 1 and model_note(model) else ""))
    return "\n\n".join(out) + "\n"


def _per_dataset(row: dict) -> dict:
    """{dataset: measures} of a row, its headline dataset (`dataset`, also at the top level) first; rows written
    before the held-out domain hold only that one."""
    first = row.get("dataset", "wikitext2")
    per = row.get("per_dataset") or {first: row}
    return {first: per[first], **{d: v for d, v in per.items() if d != first}}


def _render_one(model: str, runtime: str, mrows: list[dict]) -> str:
    mrows = sorted(mrows, key=lambda r: (FORMAT_ORDER.get(r["format"], 9), QUANTIZER_ORDER.get(r["quantizer"], 9)))
    w = mrows[0]
    first = next(iter(_per_dataset(w)))
    others = list(dict.fromkeys(d for r in mrows for d in _per_dataset(r) if d != first))
    kld_ds = [d for d in [first, *others] if any((_per_dataset(r).get(d) or {}).get("kld_runtime") for r in mrows)]
    lines = [f"**{model}, {runtime}** — perplexity inside {runtime} ({w['windows']} windows of {w['seq_len']} tokens "
             f"per text, our protocol) and ours (fake-quant, same windows)"
             + (", KL divergence of the runtime's next-token distribution from our FP model's" if kld_ds else "")
             + f"; {runtime} speed on {w['threads']} thread(s).{NOTES.get(runtime, '')}", "",
             f"| Quantizer | Format | File (MB) | PPL {first} {runtime} | PPL {first} ours | {runtime} vs ours | "
             + "".join(f"PPL {d} {runtime} | " for d in others)
             + "".join(f"KLD / top-1 {d} {runtime} | " for d in kld_ds) + "Prefill tok/s | Decode tok/s |",
             "|---|---|" + "---:|" * (6 + len(others) + len(kld_ds))]
    fp = next((r["ppl_runtime"] for r in mrows if r["quantizer"] == "none"), None)
    adapted = False
    for r in mrows:
        per = _per_dataset(r)
        ours = r["ppl_framework"]
        saw = "gptq" in r["quantizer"] or r["quantizer"].startswith(("qat", "spinquant"))  # read WikiText-2 train
        mark = ADAPTED if fp is not None and saw and r["ppl_runtime"] < fp else ""
        adapted |= bool(mark)
        rel = f"{100 * (r['ppl_runtime'] / ours - 1):+.2f}%" if ours else "–"
        name = {"none": "FP (ours, unquantized)", "llama.cpp": "llama.cpp (llama-quantize)"}.get(r["quantizer"],
                                                                                             r["quantizer"])
        cells = [name, r["format"], f"{r['file_bytes'] / 1e6:.2f}", f"{r['ppl_runtime']:.2f}{mark}",
                 "–" if ours is None else f"{ours:.2f}", rel]
        cells += [f"{per[d]['ppl_runtime']:.2f}" if d in per else "–" for d in others]
        for d in kld_ds:
            k = (per.get(d) or {}).get("kld_runtime")
            cells.append(f"{k['mean']:.4f} / {100 * k['top1']:.1f}%" if k else "–")
        cells += [f"{r['prefill_tok_s']:.0f}", f"{r['decode_tok_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    qat = sorted({_qat_recipe(r) for r in mrows if r["quantizer"].startswith("qat")})
    if qat:
        lines += ["", f"qat-*: quantization-aware training on WikiText-2 train ({' / '.join(qat)}), i.e. also "
                      "fine-tuning on the evaluation's domain: not comparable with the post-training rows as a quantizer."]
    learned = sorted({(t["steps"], t["batch_size"]) for r in mrows for t in [r.get("rotation_train") or {}] if "steps" in t})
    if learned:
        lines += ["", "spinquant-*: rotations learned in " + " / ".join(
            f"{s} steps of {b} sequences" + reduced_recipe_note(s, b)
            for s, b in learned) + "."]
    if adapted:
        lines += ["", ADAPTED_NOTE]
    calib = sorted({r["calib_samples"] for r in mrows if r.get("calib_samples")})
    if calib:
        lines += ["", f"GPTQ calibrated on {' / '.join(map(str, calib))} WikiText-2 train sequences of {w['seq_len']} "
                      "tokens (reduced protocol)."]
    revs = sorted({r["git_rev"] for r in mrows})
    lines += ["", f"Rows from commit{'s' if len(revs) > 1 else ''} {', '.join(f'`{v}`' for v in revs)}."]
    return "\n".join(lines)
