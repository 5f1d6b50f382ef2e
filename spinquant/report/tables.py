"""Render results rows into Markdown tables (one table per model).

    spinquant tables results/demo [more dirs or files] [--out paper/demo_table.md]
    spinquant tables paper/results/rotation --layout rotation   # methods x schemes
    spinquant tables paper/results/qat --layout qat             # QAT table + training cost
    spinquant tables paper/results/qat --layout qat --latex paper/qat_table.tex   # + LaTeX (booktabs)

Default layout: rows sorted FP first, then by weight bits, activation bits, KV bits (descending) and
method; columns: perplexity per dataset, wikitext2 Δ vs the FP row, size (stored bits, MB) and its ratio
to FP. Rotation layout (the papers' rotation table): one row per {rotation} x {weight quantizer}, one
column per WxAyKVz scheme, cells = perplexity on one dataset, FP on top, rotation time per row.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from ..eval.paired import paired_diff, same_windows, window_se
from ..results import read_rows
from ..writes import write_text

DATASET_ORDER = ["wikitext2", "wikitext2-tok", "python-docs", "ptb"]
MODEL_ORDER = ["smollm2-135m", "ref-llama", "stories260k"]  # the real pretrained model first, then the two toys
MODEL_NOTES = {"smollm2-135m": (
    "smollm2-135m (SmolLM2-135M-Instruct) is distributed as a Q4_1 GGUF: its linear weights lie on llama.cpp's Q4_1 "
    "grid (asymmetric blocks of 32, fp16 scale and min), so requantizing onto that same grid without a rotation would be "
    "artificially easy; the schemes here use other grids (symmetric g32, per-channel, g64, rotations, activation and "
    "KV quantization).")}


def models_of(rows: list[dict]) -> list[str]:
    """The models of `rows` in table order: MODEL_ORDER first, any other model after them by name."""
    return sorted({r["model"] for r in rows}, key=lambda m: (MODEL_ORDER.index(m) if m in MODEL_ORDER else
                                                               len(MODEL_ORDER), m))


def model_note(model: str) -> list[str]:
    """The lines a model's table ends with (what a reader must know about the model), possibly none."""
    return ["", MODEL_NOTES[model]] if model in MODEL_NOTES else []


def _method(row) -> str:
    m = row["method"]
    parts = [p for p in (m.get("rotation"), m.get("weights"), m.get("qat")) if p and p != "none"]
    return "+".join(parts) if parts else "FP"


METHOD_RANK = {"FP": 0, "rtn": 1, "gptq": 2}


def _fallback(row) -> bool:
    return bool(row["spec"].get("w_group")) and row.get("quant", {}).get("group_fallback") in ("channel", "none")


def _spec(row) -> str:
    s = row["spec"]
    if s.get("w_bits", 16) >= 16:
        return "-"
    if not s.get("w_group"):
        return "per-ch"
    return f"g{s['w_group']}" + ("*" if _fallback(row) else "")


def _sort_key(row):
    s = row["spec"]
    m = _method(row)
    mixed = bool((row.get("quant") or {}).get("overrides"))  # per-module overrides: after the uniform rows
    return (-s.get("w_bits", 16), -s.get("a_bits", 16), -s.get("kv_bits", 16), str(s.get("w_group")), mixed,
            METHOD_RANK.get(m.split("+")[-1], 9), m)


LM_EVAL_METRICS = ("word_perplexity", "bits_per_byte", "acc_norm", "acc", "exact_match")


def _lm_eval_metrics(rows, task: str) -> list[str]:
    """The metrics shown for an lm-eval task: those of LM_EVAL_METRICS its rows report (perplexity tasks: word
    perplexity and bits per byte; multiple choice: acc_norm / acc), else its first metric."""
    have = {m for r in rows for m in r["metrics"].get("lm_eval", {}).get(task, {})}
    shown = [m for m in LM_EVAL_METRICS if m in have]
    return shown[:2] if shown else sorted(have)[:1]


def _fmt_metric(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"


def _delta_cell(row, base, ds: str) -> str:
    """ppl difference to the baseline row; with per-window NLLs in both rows, ± its paired standard error and a
    '≈' where the difference is within two of them (spinquant.eval.paired)."""
    ppl = row["metrics"]["ppl"]
    if ds not in ppl:
        return "–"
    cell = f"{ppl[ds] - base['metrics']['ppl'][ds]:+.2f}"
    a, b = row["metrics"].get("ppl_detail", {}).get(ds, {}), base["metrics"].get("ppl_detail", {}).get(ds, {})
    # no pairing when either row lacks per-window NLLs or they scored different windows (a row evaluated on only
    # the first windows, marked † in its table)
    if row is base or not a.get("window_nll") or not b.get("window_nll") or not same_windows(a, b):
        return cell
    d = paired_diff(a, b)
    return cell + f" ± {d.se_ppl:.2f}" + (" ≈" if d.within_noise else "")


ADAPTED = "‡"
ADAPTED_NOTE = ("‡ below the FP model on WikiText-2 after reading WikiText-2 train (GPTQ calibration, SpinQuant "
                "rotation training or QAT): domain adaptation, not a better quantizer, until the KL divergence to the FP "
                "model and the held-out domain say otherwise.")


def saw_calibration_text(method: dict) -> bool:
    """Whether a row's method read WikiText-2 train: a calibrated weight quantizer (GPTQ), a learned rotation or QAT."""
    from ..quant import WEIGHT_QUANTIZERS
    wq = WEIGHT_QUANTIZERS.get(method.get("weights", "none"))
    return bool(wq and wq.needs_hessian) or method.get("rotation") == "spinquant" or method.get("qat", "none") != "none"


def _adapted(value: float, fp_value: float | None, row: dict) -> str:
    """'‡' for the WikiText-2 perplexity of a row that read the calibration text and lands below the FP model's (a
    data-free row below FP, e.g. RTN, is left to the paired SE of the Δ column)."""
    return ADAPTED if fp_value is not None and value < fp_value and saw_calibration_text(row["method"]) else ""


def kld_se(k: dict) -> float | None:
    """Standard error of a mean KLD from its per-window sums (windows as the independent units, as for the paired
    perplexity SE: spinquant.eval.paired.window_se), None with fewer than two windows."""
    sums = k.get("window_kld") or []
    return window_se(sums, k["tokens"]) if len(sums) >= 2 else None


def _calib_samples(rows: list[dict]) -> list[int]:
    """The calibration sizes (`data.calib_samples`) of the rows that read calibration text, when any of them is not
    the default 128 (else none: a table at the default says nothing)."""
    sizes = {c for r in rows if saw_calibration_text(r["method"])
             for c in [((r.get("config") or {}).get("data") or {}).get("calib_samples")] if c is not None}
    return sorted(sizes) if sizes - {128} else []


def _kld_cells(row, datasets: list[str]) -> list[str]:
    """Mean KL divergence to FP (± its SE over windows) and same-top-1 share per dataset ('–' for rows evaluated
    before eval.kld)."""
    k = row["metrics"].get("kld") or {}
    out = []
    for d in datasets:
        if d not in k:
            out.append("–")
            continue
        se = kld_se(k[d])
        out.append(f"{k[d]['mean']:.4f}" + (f" ± {se:.4f}" if se is not None else "") + f" / {100 * k[d]['top1']:.1f}%")
    return out


def _dataset_label(name: str) -> str:
    """A column name for a dataset: its registered name, or a text file's name without folder and extension."""
    return Path(name).stem if "/" in name or name.endswith(".txt") else name


def _subset(row) -> int | None:
    """eval.max_windows of a row evaluated on only the first windows of each dataset (None: the whole test set)."""
    return ((row.get("config") or {}).get("eval") or {}).get("max_windows")


def render(rows: list[dict]) -> str:
    out = []
    for model in models_of(rows):
        mrows = sorted([r for r in rows if r["model"] == model], key=_sort_key)
        datasets = [d for d in DATASET_ORDER if any(d in r["metrics"]["ppl"] for r in mrows)]
        datasets += sorted({d for r in mrows for d in r["metrics"]["ppl"]} - set(datasets))
        fp = next((r for r in mrows if r["spec"].get("w_bits", 16) >= 16 and r["spec"].get("a_bits", 16) >= 16
                   and r["spec"].get("kv_bits", 16) >= 16), None)
        tasks = sorted({t for r in mrows for t in r["metrics"].get("lm_eval", {})})
        le_cols = [(t, m) for t in tasks for m in _lm_eval_metrics(mrows, t)]
        head = ["Scheme", "Method", "W groups"] + [f"PPL {_dataset_label(d)}" for d in datasets]
        head += [f"{t} {m.replace('_', ' ')}" for t, m in le_cols]
        head += ["Δ wikitext2"] if fp and "wikitext2" in datasets else []
        kld_ds = [d for d in datasets if any(d in (r["metrics"].get("kld") or {}) for r in mrows)]
        head += [f"KLD / top-1 {_dataset_label(d)}" for d in kld_ds]
        head += ["Size (MB)", "× FP size"]
        trained = any("qat_train" in r["metrics"] for r in mrows)
        if trained:  # QAT rows: what the training cost
            head += ["Train tokens", "Trainable params"]
        timed = any("wall_s" in r["metrics"] for r in mrows)
        head += ["Wall s"] if timed else []
        rule = "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"
        lines = [f"**{model}**", "", "| " + " | ".join(head) + " |", rule]
        adapted = False
        for r in mrows:
            ppl = r["metrics"]["ppl"]
            mark = "†" if _subset(r) else ""
            cells = [r["scheme"], _method(r), _spec(r)] + [f"{ppl[d]:.2f}{mark}" if d in ppl else "–" for d in datasets]
            le = r["metrics"].get("lm_eval", {})
            cells += [_fmt_metric(le[t][m]) if m in le.get(t, {}) else "–" for t, m in le_cols]
            if fp and "wikitext2" in datasets:
                below = _adapted(ppl["wikitext2"], fp["metrics"]["ppl"].get("wikitext2"), r) if "wikitext2" in ppl else ""
                adapted |= bool(below)
                cells.append(_delta_cell(r, fp, "wikitext2") + below)
            cells += _kld_cells(r, kld_ds)
            size = r["metrics"].get("size_bytes")
            cells.append(f"{size / 1e6:.2f}" if size else "–")
            fps = fp["metrics"].get("size_bytes") if fp else r["metrics"].get("fp16_size_bytes")
            cells.append(f"{size / fps:.3f}" if size and fps else "–")
            if trained:
                qt = r["metrics"].get("qat_train") or {}
                cells += [f"{qt['train_tokens'] / 1e6:.2f}M" if qt else "–",
                          f"{qt['trainable_params'] / 1e6:.2f}M" if qt else "–"]
            if timed:
                cells.append(f"{r['metrics']['wall_s']:.0f}" if "wall_s" in r["metrics"] else "–")
            lines.append("| " + " | ".join(cells) + " |")
        kinds = {r["quant"]["group_fallback"] for r in mrows if _fallback(r)}
        if kinds == {"channel"}:
            lines += ["", "\\* layers whose input width the group size does not divide are quantized per-channel "
                          "(`quant.group_fallback=channel`)."]
        elif kinds:
            lines += ["", "\\* layers whose input width the group size does not divide are quantized per-channel "
                          "(`quant.group_fallback=channel`) or left in full precision (`none`)."]
        mixed = {}
        for r in mrows:
            for o in (r.get("quant") or {}).get("overrides") or []:
                what = "left FP" if o.get("skip") else ", ".join(
                    f"{k} " + " ".join(f"{a}={b}" for a, b in v.items()) for k, v in (("weight", o.get("weight")),
                                                                                  ("act", o.get("act"))) if v)
                mixed.setdefault(r["scheme"], []).append(f"`{o['modules']}` {what}")
        for scheme, items in mixed.items():
            lines += ["", f"{scheme}: the {scheme.split('-')[0]} preset with per-module overrides: "
                          f"{'; '.join(dict.fromkeys(items))}."]
        subsets = sorted({_subset(r) for r in mrows if _subset(r)})
        if subsets:
            lines += ["", f"† evaluated on only the first {' / '.join(map(str, subsets))} windows of each dataset "
                          f"(`eval.max_windows`), not the whole test set: not comparable with full-set numbers."]
        limits = sorted({lim for r in mrows if r["metrics"].get("lm_eval")
                         for lim in [(((r.get("config") or {}).get("eval") or {}).get("lm_eval") or {}).get("limit")]
                         if lim is not None})
        if limits:
            lines += ["", f"lm-eval tasks on only the first {' / '.join(map(str, limits))} documents or examples of each "
                          "(`eval.lm_eval.limit`): not comparable with whole-task numbers."]
        if adapted:
            lines += ["", ADAPTED_NOTE]
        if kld_ds:
            lines += ["", "KLD / top-1: mean KL divergence of the next-token distribution from the FP model's on the "
                          "same windows (± its standard error over windows), and the share of tokens whose most likely "
                          "next token agrees (`eval.kld`)."]
        if timed:
            lines += ["", "Wall s: the whole run (load, rotation, quantization or training, evaluation) with the CPU "
                          "threads its row records (`threads`)."]
        calib = _calib_samples(mrows)
        if calib:
            lines += ["", f"Calibration: {' / '.join(map(str, calib))} WikiText-2 train sequences of "
                          "the model's length (`data.calib_samples`; default 128) for the rows that calibrate."]
        lines += model_note(model)
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


ROTATION_NAMES = {"none": "", "quarot": "QuaRot-", "quarot-offline": "QuaRot-offline-", "spinquant": "SpinQuant-",
                  "spinquant-offline": "SpinQuant-offline-"}


def _wakv(row) -> str:
    s = row["spec"]
    return f"W{s.get('w_bits', 16)}A{s.get('a_bits', 16)}KV{s.get('kv_bits', 16)}"


def render_rotation(rows: list[dict], dataset: str = "wikitext2") -> str:
    """Methods x schemes pivot of `dataset` perplexity (and KL divergence to FP where the rows have it), then the same
    pivot for every other dataset the rows were evaluated on; rotation seconds (SpinQuant: training) per cell."""
    out = []
    for model in models_of(rows):
        mine = [r for r in rows if r["model"] == model]
        others = [d for d in DATASET_ORDER if d != dataset and any(d in r["metrics"]["ppl"] for r in mine)]
        blocks = [_rotation_pivot(model, mine, d) for d in [dataset, *others]]
        out.append("\n\n".join([b for b in blocks if b] + model_note(model)[1:]))
    return "\n\n".join(out) + "\n"


def _rotation_pivot(model: str, mine: list[dict], dataset: str) -> str:
    mrows = [r for r in mine if dataset in r["metrics"]["ppl"]]
    if not mrows:
        return ""
    fp = [r for r in mrows if _wakv(r) == "W16A16KV16" and r["method"]["rotation"] == "none"]
    q = [r for r in mrows if _wakv(r) != "W16A16KV16"]
    cols = sorted({_wakv(r) for r in q}, key=lambda c: [-int(x) for x in c[1:].replace("A", " ").replace("KV", " ").split()])
    cells: dict[tuple[str, str], dict] = {}
    for r in q:
        key = (r["method"]["rotation"], r["method"]["weights"])
        if (key, _wakv(r)) in cells:
            raise SystemExit(f"two rows for {model} {key} {_wakv(r)}: {cells[(key, _wakv(r))]['run_id']} and "
                             f"{r['run_id']}; keep one results folder per table")
        cells[(key, _wakv(r))] = r
    methods = sorted({k for k, _ in cells}, key=lambda k: (list(ROTATION_NAMES).index(k[0]) if k[0] in ROTATION_NAMES
                                                             else 9, METHOD_RANK.get(k[1], 9), k))
    with_kld = any(dataset in (r["metrics"].get("kld") or {}) for r in q)
    timed = all("wall_s" in r["metrics"] for r in q)
    head = ["Method"] + cols + ["Rotation s (per column)"] + (["Wall s (per column)"] if timed else [])
    what = f"{dataset} perplexity" + (" / KL divergence to FP" if with_kld else "")
    subset = sorted({_subset(r) for r in mrows if _subset(r)})
    calib = _calib_samples(mrows)
    notes = ([f"first {' / '.join(map(str, subset))} windows of each text, `eval.max_windows`"] if subset else []) + \
        ([f"GPTQ calibrated on {' / '.join(map(str, calib))} sequences, `data.calib_samples`"] if calib else [])
    lines = [f"**{model}** — {what}" + (f" ({'; '.join(notes)})" if notes else ""), "", "| " + " | ".join(head) + " |",
             "|---|" + "|".join(["---:"] * len(cols)) + "|---:|" + ("---:|" if timed else "")]
    fp_v = fp[0]["metrics"]["ppl"][dataset] if fp else None
    if fp:
        fp_wall = f" | {fp[0]['metrics']['wall_s']:.0f}" if timed and "wall_s" in fp[0]["metrics"] else " | –" if timed else ""
        lines.append("| FP | " + " | ".join(f"{fp_v:.2f}" for _ in cols) + " | –" + fp_wall + " |")
    adapted = False
    for k in methods:
        name = ROTATION_NAMES.get(k[0], k[0] + "-") + k[1].upper()
        ppl = []
        for c in cols:
            r = cells.get((k, c))
            v = r["metrics"]["ppl"][dataset] if r is not None else None
            if v is None:
                ppl.append("–")
                continue
            mark = _adapted(v, fp_v, r) if dataset == "wikitext2" else ""
            kld = (r["metrics"].get("kld") or {}).get(dataset)
            ppl.append(f"{v:.2f}{mark}" + (f" / {kld['mean']:.3f}" if kld else " / –" if with_kld else ""))
            adapted |= bool(mark)
        secs = [cells[(k, c)]["metrics"].get("rotation_s") for c in cols if (k, c) in cells]
        rot = " / ".join(f"{s:.0f}" for s in secs) if k[0] != "none" and secs else "–"
        wall = " | " + " / ".join(f"{cells[(k, c)]['metrics']['wall_s']:.0f}" for c in cols if (k, c) in cells) \
            if timed else ""
        lines.append(f"| {name} | " + " | ".join(ppl) + f" | {rot}{wall} |")
    if adapted:
        lines += ["", ADAPTED_NOTE]
    if dataset == "wikitext2":
        lines += _spinquant_recipe(cells, cols)
    if timed:
        lines += ["", "Wall s: each run whole (load, rotation, quantization, evaluation) with the CPU threads its row "
                      "records (`threads`)."]
    return "\n".join(lines)


OFFICIAL_SPINQUANT = (100, 8)  # steps, global batch of the official recipe (rotation/spinquant.yaml)


def reduced_recipe_note(steps: int, batch: int) -> str:
    """' (**reduced recipe**; ...)' for SpinQuant training other than the official steps and batch, else ''."""
    return "" if (steps, batch) == OFFICIAL_SPINQUANT else " (**reduced recipe**; the official: 100 steps of 8)"


def _spinquant_recipe(cells: dict, cols: list[str]) -> list[str]:
    """A note naming the recipe the learned rotations trained with (steps x global batch x length, against the official
    100 x 8) and what it did to the held-back objective, per method and column."""
    learned = {key: r["metrics"]["rotation_train"] for key, r in cells.items() if "rotation_train" in r["metrics"]
               and "steps" in r["metrics"]["rotation_train"]}
    if not learned:
        return []
    recipes = sorted({(t["steps"], t["batch_size"], t["seq_len"]) for t in learned.values()})
    text = "; ".join(f"{s} step{'s' * (s != 1)} of {b} sequences of {n} tokens" +
                     (reduced_recipe_note(s, b) or " (the official recipe's steps and batch)") for s, b, n in recipes)
    parts = []
    for (k, c), t in sorted(learned.items(), key=lambda kc: (METHOD_RANK.get(kc[0][0][1], 9), cols.index(kc[0][1]))):
        d = t["heldout_loss_after"] - t["heldout_loss_before"]
        parts.append(f"{ROTATION_NAMES.get(k[0], k[0] + '-')}{k[1].upper()} {c} {d:+.3f}{se_text(t)}")
    return ["", f"SpinQuant rotations learned in {text}; change of the objective on {learned[next(iter(learned))]['heldout']}"
                f" held-back sequences: " + ", ".join(parts) + "."]


QAT_METHODS = [  # (rotation, weights, qat) -> label, in table order
    (("none", "none", "none"), "FP"), (("none", "rtn", "none"), "PTQ RTN"), (("none", "gptq", "none"), "PTQ GPTQ"),
    (("none", "rtn", "full"), "QAT (full)"), (("none", "rtn", "lora"), "QAT+LoRA"),
    (("spinquant", "rtn", "lora"), "SpinQuant+QAT+LoRA")]


QAT_SCHEME_ORDER = ["W4A8", "W4A4KV4", "W3A16-g64", "W2A16-g64"]
MIN_GAP = 0.01  # below this RTN→FP gap (relative to FP) a "% recovered" is noise: the row is marked "< FP" instead


def _method_key(r) -> tuple[str, str, str]:
    """(rotation, weight quantizer, qat) of a row."""
    return r["method"]["rotation"], r["method"]["weights"], r["method"]["qat"]


def _qat_scheme(row) -> str:
    s = row["spec"]
    g = s.get("w_group")
    return row["scheme"] + (f"-g{g}" if g and s.get("a_bits", 16) >= 16 else "")


def render_qat(rows: list[dict], dataset: str = "wikitext2") -> str:
    """Methods x schemes pivot of `dataset` perplexity (and KL divergence to FP where the rows have it) with the share
    of the RTN→FP gap each row recovers, the same pivot for every other evaluated text, then the training cost of
    every trained row (tokens, trainable parameters, time, throughput)."""
    out = []
    for model in models_of(rows):
        mine = [r for r in rows if r["model"] == model]
        others = [d for d in DATASET_ORDER if d != dataset and any(d in r["metrics"]["ppl"] for r in mine)]
        blocks = [_qat_pivot(model, mine, d) for d in [dataset, *others]]
        out.append("\n\n".join([b for b in blocks if b] + _qat_training(mine, dataset) + model_note(model)[1:]))
    return "\n\n".join(out) + "\n"


def _qat_cells(mrows: list[dict]) -> tuple[list[str], dict]:
    """The quantized columns (scheme names, table order) and {(method key, column): row} of one model's rows."""
    q = [r for r in mrows if r["spec"].get("w_bits", 16) < 16]
    cols = sorted({_qat_scheme(r) for r in q}, key=lambda c: (QAT_SCHEME_ORDER.index(c) if c in QAT_SCHEME_ORDER
                                                              else len(QAT_SCHEME_ORDER), c))
    cells = {}
    for r in q:
        k = (_method_key(r), _qat_scheme(r))
        if k in cells:
            raise SystemExit(f"two rows for {r['model']} {k}: {cells[k]['run_id']} and {r['run_id']}")
        cells[k] = r
    return cols, cells


def _qat_pivot(model: str, mine: list[dict], dataset: str) -> str:
    mrows = [r for r in mine if dataset in r["metrics"]["ppl"]]
    if not mrows:
        return ""
    fp = next((r for r in mrows if _method_key(r) == ("none", "none", "none")), None)
    cols, cells = _qat_cells(mrows)

    def ppl(r):
        return r["metrics"]["ppl"][dataset]

    def kld(r):
        k = (r["metrics"].get("kld") or {}).get(dataset)
        return f" / {k['mean']:.3f}" if k else " / –" if with_kld else ""

    with_kld = any(dataset in (r["metrics"].get("kld") or {}) for r in mrows if r is not fp)
    control = next((r for r in mrows if _method_key(r) == ("none", "none", "lora")), None)
    # the same LoRA training without quantization is what fine-tuning alone reaches: QAT is measured against it
    ref_name = "FP + LoRA control" if control else "FP"
    subset = sorted({_subset(r) for r in mrows if _subset(r)})
    what = f"{dataset} perplexity" + (" / KL divergence to FP" if with_kld else "")
    lines = [f"**{model}** — {what} (" + (f"first {' / '.join(map(str, subset))} windows, `eval.max_windows`; "
                                           if subset else "") +
             f"in brackets: share of the {'perplexity ' if with_kld else ''}gap from RTN to the {ref_name} that QAT "
             "recovers" + (", then the share of the RTN→FP gap" if control else "") +
             f", where the RTN→FP gap is over {100 * MIN_GAP:g}% of FP; < FP: below the FP model)", "",
             "| Method | " + " | ".join(cols) + " |", "|---|" + "|".join(["---:"] * len(cols)) + "|"]
    if fp:
        lines.append("| FP | " + " | ".join(f"{ppl(fp):.2f}" for _ in cols) + " |")

    def mark(r):
        return _adapted(ppl(r), ppl(fp), r) if fp and dataset == "wikitext2" else ""

    if control:
        lines.append("| FP + LoRA (control) | " + " | ".join(f"{ppl(control):.2f}{mark(control)}{kld(control)}"
                                                            for _ in cols) + " |")
    for mk, label in QAT_METHODS[1:]:
        if not any((mk, c) in cells for c in cols):
            continue
        row = []
        for c in cols:
            r, rtn = cells.get((mk, c)), cells.get((("none", "rtn", "none"), c))
            if r is None:
                row.append("–")
                continue
            cell = f"{ppl(r):.2f}{mark(r)}{kld(r)}"
            if mk[2] != "none" and fp and rtn:
                gap = ppl(rtn) - ppl(fp)
                if gap > MIN_GAP * ppl(fp):
                    vs_fp = f"{100 * (ppl(rtn) - ppl(r)) / gap:.0f}%"
                    cell += (f" ({100 * (ppl(rtn) - ppl(r)) / (ppl(rtn) - ppl(control)):.0f}% / {vs_fp} FP)" if control
                             else f" ({vs_fp})")
                elif ppl(r) < ppl(fp):
                    cell += " (< FP)"
            row.append(cell)
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    if any(mark(r) for r in [*cells.values(), *([control] if control else [])]):
        lines += ["", ADAPTED_NOTE]
    if dataset == "wikitext2":
        lines += _spinquant_recipe(cells, cols)
    return "\n".join(lines)


def _qat_training(mine: list[dict], dataset: str) -> list[str]:
    """The training cost of every trained row: tokens, trainable parameters, time, throughput."""
    mrows = [r for r in mine if dataset in r["metrics"]["ppl"]]
    cols, _ = _qat_cells(mrows)
    trained = sorted([r for r in mrows if "qat_train" in r["metrics"]],
                     key=lambda r: (cols.index(_qat_scheme(r)) if _qat_scheme(r) in cols else -1, str(_method_key(r))))
    if not trained:
        return []
    labels = dict(QAT_METHODS)
    lines = ["| Scheme | Method | Train tokens | Trainable params | Train s | Train tok/s | Wall s | "
             f"PPL {dataset} |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    resumed = 0
    for r in trained:
        t = r["metrics"]["qat_train"]
        name = labels.get(_method_key(r)) or ("FP + LoRA fine-tune" if r["method"]["qat"] == "lora" else
                                              "FP fine-tune" if r["method"]["qat"] == "full" else str(_method_key(r)))
        if r["spec"].get("w_bits", 16) >= 16:
            name += " (control)"
        timed = _qat_train_s(t)
        speed = f"{timed:.0f} | {t['train_tokens'] / timed:.0f}" if timed else "– | –"
        wall = "–" if t.get("resumed_from") else f"{r['metrics']['wall_s']:.0f}"
        resumed += bool(t.get("resumed_from"))
        lines.append(f"| {_qat_scheme(r)} | {name} | {_count(t['train_tokens'])} | "
                     f"{t['trainable_params'] / 1e6:.2f}M | {speed} | {wall} | {r['metrics']['ppl'][dataset]:.2f} |")
    if resumed:
        lines += ["", f"{resumed} run(s) resumed from a checkpoint: Wall s (and Train s where the checkpoint "
                  "did not record the earlier processes' time) would cover only the last process, so it is "
                  "left out (–)."]
    return ["\n".join(lines)]


def _count(n: int) -> str:
    """A token count as 0.41M, or 16K below 0.1M (where two decimals of millions would read 0.02M)."""
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.0f}K"


def _qat_train_s(t: dict) -> float | None:
    """A QAT row's training seconds over all its steps, or None when unknown: a run resumed from a checkpoint
    that did not record the earlier processes' time (rows without `prior_train_s` timed only the last part)."""
    if t.get("resumed_from") and t.get("prior_train_s") is None:
        return None
    return t.get("train_s") or None


LATEX_SUBS = [("&", r"\&"), ("%", r"\%"), ("#", r"\#"), ("_", r"\_"), ("$", r"\$"), ("{", r"\{"), ("}", r"\}"),
              ("~", r"\textasciitilde{}"), ("^", r"\textasciicircum{}"), ("Δ", r"$\Delta$"), ("×", r"$\times$"),
              ("→", r"$\to$"), ("–", "--"), ("—", "---"), ("≥", r"$\geq$"), ("≤", r"$\leq$"), ("±", r"$\pm$"),
              ("≈", r"$\approx$")]


def _latex_text(text: str) -> str:
    """Escape one Markdown cell or line for LaTeX; **bold** and `code` become \textbf and \texttt."""
    out = []
    for chunk in re.split(r"(\*\*[^*]+\*\*|`[^`]+`)", text):
        if len(chunk) > 4 and chunk.startswith("**") and chunk.endswith("**"):
            out.append(r"\textbf{" + _latex_text(chunk[2:-2]) + "}")
        elif len(chunk) > 2 and chunk.startswith("`") and chunk.endswith("`"):
            out.append(r"\texttt{" + _latex_text(chunk[1:-1]) + "}")
        else:
            chunk = chunk.replace("\\*", "*").replace("\\", "\x00")
            for a, b in LATEX_SUBS:
                chunk = chunk.replace(a, b)
            out.append(chunk.replace("\x00", r"\textbackslash{}"))
    return "".join(out)


def to_latex(markdown: str) -> str:
    """The same tables as LaTeX booktabs `tabular`s: each Markdown table (| rows |) becomes a tabular with the
    Markdown's column alignment; every other non-empty line (titles, notes) becomes a paragraph."""
    out, table = [], []

    def flush():
        if not table:
            return
        head, align, *body = table
        cols = "".join("r" if a.strip().endswith(":") else "l" for a in align)
        out.append(r"\begin{tabular}{" + cols + "}")
        out.append(r"\toprule")
        out.append(" & ".join(_latex_text(c) for c in head) + r" \\")
        out.append(r"\midrule")
        out.extend(" & ".join(_latex_text(c) for c in row) + r" \\" for row in body)
        out.extend([r"\bottomrule", r"\end{tabular}", ""])
        table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            table.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        flush()
        if line.strip():
            out += [_latex_text(line.strip()), ""]
    flush()
    return "% generated by scripts/make_tables.py from results rows; do not edit\n" + "\n".join(out).rstrip() + "\n"


def se_text(train_stats: dict) -> str:
    """' ± SE' of a held-back change when the row records its paired standard error (older rows do not), else ''."""
    se = train_stats.get("heldout_delta_se")
    return f" ± {se:.4f}" if se is not None else ""


def render_study(rows: list[dict], dataset: str = "wikitext2") -> str:
    """The SpinQuant study: one line per (weight quantizer, lr, steps, global batch, rotation seed) with the objective
    on the held-back calibration sequences before and after training and the resulting perplexity (best in bold);
    settings run with several seeds get their spread below the table."""
    def seed(r):
        return int(r["config"].get("rotation", {}).get("seed", 0) or 0)

    def setting(r):
        return tuple(r["metrics"]["rotation_train"][k] for k in ("lr", "steps", "batch_size"))
    out = []
    for model in models_of(rows):
        lines = [f"**{model}** — SpinQuant at {', '.join(sorted({r['scheme'] for r in rows if r['model'] == model}))}: "
                 f"held-back objective (cross-entropy of the training-time quantized model) and {dataset} perplexity",
                 "", "| Weights | lr | Steps | Batch | Seed | Sequences | Held-out CE before | after | Δ | PPL " + dataset +
                 " | Train s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        spreads = []
        for weights in ("rtn", "gptq"):
            mr = [r for r in rows if r["model"] == model and r["method"]["weights"] == weights]
            if not mr:
                continue
            mr.sort(key=lambda r: (setting(r), seed(r)))
            best = min(r["metrics"]["ppl"][dataset] for r in mr)
            for r in mr:
                t, ppl = r["metrics"]["rotation_train"], r["metrics"]["ppl"][dataset]
                d = t["heldout_loss_after"] - t["heldout_loss_before"]
                cell = f"**{ppl:.2f}**" if ppl == best else f"{ppl:.2f}"
                lines.append(f"| {weights.upper()} | {t['lr']:g} | {t['steps']} | {t['batch_size']} | {seed(r)} | "
                             f"{t['steps'] * t['batch_size']} | {t['heldout_loss_before']:.4f} | "
                             f"{t['heldout_loss_after']:.4f} | {d:+.4f}{se_text(t)} | {cell} | {t['train_s']:.0f} |")
            for key in sorted({setting(r) for r in mr}):
                ppls = [r["metrics"]["ppl"][dataset] for r in mr if setting(r) == key]
                if len(ppls) > 1:
                    mean = sum(ppls) / len(ppls)
                    spreads.append(f"{weights.upper()} lr {key[0]:g}, {key[1]} steps, batch {key[2]} over {len(ppls)} "
                                   f"seeds: mean {mean:.2f}, min {min(ppls):.2f}, max {max(ppls):.2f}")
        out.append("\n".join(lines + ([""] + [f"- {s}" for s in spreads] if spreads else [])))
    return "\n\n".join(out) + "\n"


LAYOUTS = {"schemes": "render", "rotation": "render_rotation", "qat": "render_qat", "spinquant_study": "render_study"}


def provenance(rows: list[dict]) -> str:
    """The commits the rows come from, per model, most rows first: what a table says about its own provenance."""
    parts, mixed = [], False
    for model in models_of(rows):
        revs: dict[str, int] = {}
        for r in rows:
            if r["model"] == model:
                revs[str(r.get("git_rev"))] = revs.get(str(r.get("git_rev")), 0) + 1
        mixed |= len(revs) > 1
        parts.append(f"{model} " + ", ".join(f"`{rev}` ({n})" for rev, n in sorted(revs.items(), key=lambda kv: (-kv[1], kv[0]))))
    return "Rows (per model: commit, rows) from " + "; ".join(parts) + \
        (": a model whose rows span commits is to be regenerated at one commit." if mixed else ".") + "\n"


def render_layout(rows: list[dict], layout: str, dataset: str = "wikitext2") -> str:
    """Markdown of `rows` in one of the LAYOUTS, ending with the commits the rows come from."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    fn = globals()[LAYOUTS[layout]]
    return (fn(rows) if layout == "schemes" else fn(rows, dataset)) + "\n" + provenance(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="results folders or row files")
    p.add_argument("--out", type=Path, help="write the Markdown here too")
    p.add_argument("--latex", type=Path, help="write the tables as LaTeX (booktabs) here")
    p.add_argument("--layout", choices=list(LAYOUTS), default="schemes",
                   help="schemes: one row per run; rotation: methods x WxAyKVz schemes (the rotation table); "
                        "qat: methods x schemes with the RTN→FP gap recovered and the training cost")
    p.add_argument("--dataset", default="wikitext2", help="the perplexity shown by --layout rotation")
    p.add_argument("--splice", action="append", default=[], metavar="FILE:MARKER",
                   help="replace the text between <!-- BEGIN MARKER --> and <!-- END MARKER --> in FILE")
    args = p.parse_args(argv)
    rows = read_rows(args.paths)
    if not rows:
        raise SystemExit(f"no results rows under {args.paths}")
    text = render_layout(rows, args.layout, args.dataset)
    if args.out:
        write_text(args.out, text, "table (--out)")
    if args.latex:
        write_text(args.latex, to_latex(text), "LaTeX table (--latex)")
    for target in args.splice:
        splice(Path(target.rsplit(":", 1)[0]), target.rsplit(":", 1)[1], text)
    print(text)


def splice(path: Path, marker: str, text: str) -> None:
    """Put `text` between the BEGIN/END marker comments of `path` (clear error if they are missing)."""
    begin, end = f"<!-- BEGIN {marker} -->", f"<!-- END {marker} -->"
    doc = path.read_text()
    if begin not in doc or end not in doc:
        raise SystemExit(f"{path} has no {begin} ... {end} block to splice the table into")
    head, rest = doc.split(begin, 1)
    write_text(path, head + begin + "\n" + text + end + rest.split(end, 1)[1])

