"""The deploy table: GGUF files measured inside llama.cpp (llama.cpp's own quantizations beside ours) and ExecuTorch
programs measured inside ExecuTorch's runtime.

    python scripts/bench_deploy.py --model ref-llama --out paper/results/deploy      # rows: <model>-<quantizer>-<format>.json
    python scripts/bench_deploy.py --model stories260k --out paper/results/deploy

Per model, in one process: our FP model written as an F32 GGUF; llama.cpp's own Q8_0 / Q4_0 / Q4_K_M of that
file (llama_model_quantize, the `llama-quantize` a user runs); and ours (RTN, GPTQ, SpinQuant-offline + GPTQ,
fixed-scale full QAT) quantized on the GGUF grids and exported bit-exactly. Each file's perplexity on WikiText-2 and
on the held-out domain (python-docs) is computed inside llama.cpp with our windows (spinquant.deploy.LlamaCppLM
through eval.perplexity_of_ids), with the KL divergence of its logits from our FP model's and top-1 agreement on the
same tokens; our rows also carry our fake-quant perplexity and KLD on the same windows. ExecuTorch (`--runtimes
executorch`): our FP model as an FP32 XNNPACK program, and ours (RTN, GPTQ, QuaRot R1/R2/R4 + GPTQ, fixed-scale full
QAT) at Meta's W4A8 recipe (quant=executorch_w4a8), each run in ExecuTorch's runtime with the same windows and
measures. Rows are written one by one (atomically); a rerun skips the rows that exist.

    python scripts/bench_deploy.py --model smollm2-135m --out paper/results/deploy --max-windows 16 --calib-samples 32 \
        --reduced

`--reduced`: the labelled recipes of a 2-core machine, as the smollm2-135m tables use them (SpinQuant: the steps,
batch and samples of rotation=spinquant_reduced; QAT: scripts/pending_rows.py's QAT_REDUCED); rows record them.

"""
from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def main(argv=None):
    from omegaconf import OmegaConf

    from spinquant import cli, deploy, pipeline
    from spinquant.ct_export import check_config as ct_check
    from spinquant.ct_export import export_compressed_tensors
    from spinquant.data import tokenize_dataset
    from spinquant.et_export import check_config as et_check
    from spinquant.et_export import export_executorch
    from spinquant.eval.perplexity import perplexity_of_ids
    from spinquant.eval.reference import CachedLogits
    from spinquant.gguf_export import check_config as gguf_check
    from spinquant.gguf_export import export_gguf
    from spinquant.models.load import load_config, resolve_path
    from spinquant.results import revision_for

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ref-llama")
    p.add_argument("--out", type=Path, default=Path("results/deploy"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--datasets", nargs="+", default=["wikitext2", "python-docs"],
                   help="texts to evaluate on (the first is the table's headline; default: WikiText-2 and the held-out "
                        "domain)")
    p.add_argument("--calib-samples", type=int, default=None, help="GPTQ calibration sequences (default: the config's)")
    p.add_argument("--no-kld", action="store_true", help="leave out the KL divergence to the FP model")
    p.add_argument("--only", nargs="*", default=None, help="quantizer-format labels to run (default: all)")
    p.add_argument("--reduced", action="store_true",
                   help="SpinQuant and QAT rows with the reduced recipes of the smollm2-135m tables (see above)")
    p.add_argument("--runtimes", nargs="*", default=["llama.cpp", "executorch", "transformers"],
                   choices=["llama.cpp", "executorch", "transformers"])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rev = revision_for(args.out / "x.json")
    base = [f"model={args.model}", "progress=false", "wandb.mode=disabled", f"threads={args.threads}"]
    base += [] if args.calib_samples is None else [f"data.calib_samples={args.calib_samples}"]
    # stories260k's MLP width 172 has no blocks of 32: GGUF keeps down_proj F16 (as llama.cpp does), ExecuTorch takes
    # it at int4 per channel (XNNPACK's qc4w)
    fallback = {"gguf": [], "et": []} if args.model != "stories260k" else \
        {"gguf": ["quant.group_fallback=none"], "et": ["quant.group_fallback=channel"]}
    fp_cfg = pipeline.RunConfig.from_dict(OmegaConf.to_container(cli.compose(*base), resolve=True))  # our FP model
    mconf = load_config(fp_cfg.model.path)
    ct_group = next((g for g in (128, 64, 32) if mconf.hidden_size % g == 0), 32)  # vLLM's Marlin takes 128/64/32
    fallback["ct"] = [] if mconf.intermediate_size % ct_group == 0 else ["quant.group_fallback=channel"]
    ours_ct = [(q, fmt.replace("g128", f"g{ct_group}"), [*o, f"++quant.weight.group_size={ct_group}"] if "g128" in fmt
                else o) for q, fmt, o in deploy.OURS_CT]
    jobs = {"executorch": [(q, deploy.ET_FORMAT, o) for q, o in deploy.OURS_ET], "transformers": ours_ct,
            "llama.cpp": deploy.OURS}
    if args.reduced:
        jobs = {rt: [(q, fmt, reduced_recipe(o)) for q, fmt, o in js] for rt, js in jobs.items()}
    runtime_fallback = {"executorch": fallback["et"], "transformers": fallback["ct"], "llama.cpp": fallback["gguf"]}

    def compose(*overrides):
        return pipeline.RunConfig.from_dict(OmegaConf.to_container(cli.compose(*base, *overrides), resolve=True))

    def selected(quantizer, fmt):
        return args.only is None or f"{quantizer}-{fmt}" in args.only

    # every selected file's config, checked before anything is loaded or quantized (group sizes against the model's
    # widths, datasets, the format's refusals): a bad combination fails now, not after an hour of other rows
    checks = {"executorch": et_check, "transformers": ct_check, "llama.cpp": gguf_check}
    for runtime in args.runtimes:
        for quantizer, fmt, overrides in jobs[runtime]:
            if selected(quantizer, fmt):
                cfg = compose(*runtime_fallback[runtime], *overrides)
                checks[runtime](cfg.quant, cfg.rotation, cfg.qat)
                pipeline.preflight(cfg, None)
    model, tok = pipeline.load_model(fp_cfg.model)
    seq_len, vocab = fp_cfg.model.seq_len, model.config.vocab_size
    texts = {ds: tokenize_dataset(tok, ds, add_bos=True) for ds in args.datasets}
    # every file is compared with our FP model's logits on the same windows: computed once, kept on disk for the run
    logits_dir = tempfile.TemporaryDirectory(prefix="spinquant-fp-logits-")
    reference = None if args.no_kld else CachedLogits(model, logits_dir.name)
    common = {"git_rev": rev, "torch": torch.__version__, "seed": 0, "calib_samples": args.calib_samples}

    def ours_on(m, ref=reference):
        """Our framework's (fake-quant) perplexity and KLD on the same windows, per dataset."""
        return {ds: perplexity_of_ids(m, ids, seq_len, max_windows=args.max_windows, progress=False, reference=ref)
                for ds, ids in texts.items()}

    def out_path(quantizer, fmt):
        return args.out / f"{args.model}-{quantizer}-{fmt}.json"

    def wanted(quantizer, fmt):
        return selected(quantizer, fmt) and not out_path(quantizer, fmt).exists()

    def measure_files(runtime, export, row_fn, fp_fmt=None, fp_file=None):
        """One runtime's rows: our FP model's file (`fp_file`, or exported from a copy) when `fp_fmt`, then each of
        ours quantized, exported, measured in the runtime beside our fake-quant numbers, written, removed."""
        def measured(quantizer, fmt, path, ours, extra):
            write_row(row_fn(args.model, fmt, quantizer, path, texts, seq_len, vocab, args.threads, args.max_windows,
                             ours, extra, reference), out_path(quantizer, fmt))

        if fp_fmt and wanted("none", fp_fmt):
            measured("none", fp_fmt, fp_file or export(copy.deepcopy(model), "fp32"), ours_on(model, None), common)
        for quantizer, fmt, overrides in jobs[runtime]:
            if not wanted(quantizer, fmt):
                continue
            t = time.time()
            qmodel = pipeline.build_quantized(compose(*runtime_fallback[runtime], *overrides), tok,
                                              rid=f"deploy-{args.model}-{quantizer}-{fmt}")[0]
            extra = {**common, "overrides": overrides, "quantize_s": time.time() - t,
                     **pipeline.rotation_train_metrics(qmodel)}
            ours = ours_on(qmodel)
            path = export(qmodel, f"ours-{quantizer}-{fmt}")
            del qmodel
            measured(quantizer, fmt, path, ours, extra)
            if path.is_dir():  # a compressed-tensors checkpoint
                shutil.rmtree(path)
            else:
                os.remove(path)

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        if "executorch" in args.runtimes:
            measure_files("executorch", lambda m, name: export_executorch(m, d / f"{name}.pte", max_seq_len=seq_len),
                          deploy.et_deploy_row, fp_fmt="FP32")
        if "transformers" in args.runtimes:
            measure_files("transformers", lambda m, name: export_compressed_tensors(m, d / name, tok),
                          deploy.transformers_deploy_row)
        if "llama.cpp" not in args.runtimes:
            return
        model_path = resolve_path(fp_cfg.model.path)
        fp_file = export_gguf(model, d / "fp32.gguf", model_path, name=args.model, fp="F32")
        for fmt in deploy.LLAMA_CPP:  # llama.cpp's own quantizations of our FP file, the baseline a llama.cpp user picks
            if wanted("llama.cpp", fmt):
                f = deploy.quantize_gguf(fp_file, d / f"llama-{fmt}.gguf", fmt, args.threads)
                write_row(deploy.deploy_row(args.model, fmt, "llama.cpp", f, texts, seq_len, vocab, args.threads,
                                     args.max_windows, None, common, reference), out_path("llama.cpp", fmt))
        measure_files("llama.cpp", lambda m, name: export_gguf(m, d / f"{name}.gguf", model_path, name=args.model),
                      deploy.deploy_row, fp_fmt="F32", fp_file=fp_file)


def reduced_recipe(overrides: list[str]) -> list[str]:
    """A row's overrides with SpinQuant and QAT at the reduced recipes (--reduced); other rows unchanged."""
    from pending_rows import QAT_REDUCED

    from spinquant import cli
    out = list(overrides)
    if any(o.startswith("rotation=spinquant") for o in out):
        r = cli.compose("rotation=spinquant_reduced").rotation
        out += [f"rotation.{k}={r[k]}" for k in ("steps", "batch_size", "samples")]
    if any(o.startswith("qat=") and o != "qat=none" for o in out):
        out = [o for o in out if not o.startswith(("qat.train.steps=", "qat.train.batch_size="))] + QAT_REDUCED
    return out


def write_row(row, path):
    from spinquant.results import write_deploy_row
    write_deploy_row(row, path)
    ours = row["ppl_framework"]
    print(f"[done] {row['runtime']} {row['quantizer']} {row['format']}: {row['ppl_runtime']:.3f}"
          + ("" if ours is None else f" / ours {ours:.3f}"), flush=True)


if __name__ == "__main__":
    main()
