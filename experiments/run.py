"""One experiment run -> one results row.

    python experiments/run.py model=ref-llama quant=w4a8_gptq
    python experiments/run.py -m +experiment=demo            # a table's sweep (experiments/<table>.yaml)
    python experiments/run.py -m +experiment=demo hydra/launcher=joblib   # its runs in parallel processes

Load the model, rotate, quantize, (QAT), evaluate perplexity / lm-eval tasks / size / memory, mirror the
row into wandb (offline by default) and write results/<experiment>/<run_id>.json atomically. A rerun with
the same resolved config is skipped, so a killed sweep rerun loses nothing; `sweep.skip` rules drop the
combinations of a sweep that are not rows of its table (spinquant/sweeps.py).
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import qat  # noqa: E402
from spinquant import rotation, tracking  # noqa: E402
from spinquant.data import calibration_batch, dataset_path, tokenize_dataset  # noqa: E402
from spinquant.eval import PeakMemory, fp16_size_bits, perplexity, size_bits, size_on_disk  # noqa: E402
from spinquant.models import load  # noqa: E402
from spinquant.models.load import check_device, load_config, load_tokenizer  # noqa: E402
from spinquant.quant import QuantConfig, get_weight_quantizer, quantize_  # noqa: E402
from spinquant.quant.apply import check_config_shapes  # noqa: E402
from spinquant.results import revision_for, run_id, write_row  # noqa: E402
from spinquant.sweeps import hydra_choices, skip_rule  # noqa: E402

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_plugins(names) -> None:
    """Import user modules (dotted names or .py files) that register quantizers, families or rotations."""
    for name in names or []:
        name = str(name)
        if name.endswith(".py"):
            path = Path(name).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"plugin file {path} does not exist (plugins: {list(names)})")
            mod_name = f"spinquant_plugin_{path.stem}"
            if getattr(sys.modules.get(mod_name), "__file__", None) == str(path.resolve()):
                continue  # a sweep in one process loads each plugin once
            spec = importlib.util.spec_from_file_location(mod_name, path.resolve())
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        else:
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as e:
                raise ModuleNotFoundError(f"plugin {name!r} cannot be imported ({e}); give a module on the Python "
                                          f"path or a path to a .py file") from None


def _resolve_seq_len(cfg: DictConfig) -> None:
    """model.seq_len null (model=local): the model's context, capped at the papers' 2048, said out loud."""
    if cfg.model.get("seq_len") is None:
        ctx = getattr(load_config(cfg.model.path), "max_position_embeddings", None) or 2048
        cfg.model.seq_len = min(2048, ctx)
        print(f"[note] model.seq_len=null: evaluating and calibrating at {cfg.model.seq_len} tokens "
              f"(min(2048, max_position_embeddings={ctx})); set model.seq_len to choose")


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError as e:
        raise PermissionError(f"results folder {folder} is not writable ({e.strerror}); set results_dir to a "
                              f"writable folder") from None


def _check_long_enough(tok, name: str, root, need: int, what: str) -> None:
    n = tokenize_dataset(tok, name, root, add_bos=False).shape[1]
    if n < need:
        raise ValueError(f"{what} {name!r} has {n} tokens, fewer than the {need} one window needs")


def preflight(cfg: DictConfig, qcfg: QuantConfig, out: Path):
    """Everything checkable before the model's weights are read (and before GPTQ / SpinQuant / QAT run), so a
    bad config fails in seconds: device, results folder, model family and tokenizer, group sizes against every
    layer the config quantizes (from config.json), eval length against the model's context, every dataset
    present and at least one window long. Returns the tokenizer."""
    check_device(cfg.device)
    _check_writable(out.parent)
    get_weight_quantizer(qcfg.method)  # unknown method (a plugin not loaded?): a clear error now, not after loading
    if cfg.model.dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {list(DTYPES)}, got {cfg.model.dtype!r}")
    mconf = load_config(cfg.model.path)
    check_config_shapes(mconf, qcfg)
    ctx = getattr(mconf, "max_position_embeddings", None)
    if ctx and cfg.eval.seq_len > ctx:
        raise ValueError(f"eval.seq_len={cfg.eval.seq_len} exceeds the model's context (max_position_embeddings="
                         f"{ctx}); set model.seq_len (or eval.seq_len) to at most {ctx}")
    tok = load_tokenizer(cfg.model.path)
    root = cfg.data.root
    for ds in cfg.eval.datasets:
        _check_long_enough(tok, ds, root, cfg.eval.seq_len, "eval dataset")
    if qcfg.weight.enabled and get_weight_quantizer(qcfg.method).needs_hessian:
        _check_long_enough(tok, cfg.data.calib, root, cfg.data.calib_seq_len + 2, "calibration text")
    if cfg.rotation.name == "spinquant" and not cfg.rotation.get("load"):
        from spinquant.rotation.spinquant import check_config
        check_config(cfg.rotation, int(os.environ.get("WORLD_SIZE", 1)))
        _check_long_enough(tok, cfg.data.calib, root, cfg.rotation.seq_len + 2, "calibration text")
    if cfg.qat.name != "none":
        dataset_path(cfg.qat.data, root)
    le = cfg.eval.get("lm_eval") or {}
    if le.get("tasks"):
        from spinquant.eval.harness import check_tasks
        check_tasks(list(le.tasks), le.include_defaults, root)
    return tok


def run(cfg: DictConfig, choices: dict[str, str] | None = None) -> dict:
    """One run -> one row (returned). `choices`: the Hydra group options of this job (for `sweep.skip`)."""
    choices = hydra_choices() if choices is None else choices
    rule = skip_rule(cfg, choices, cfg.get("sweep", {}).get("skip"))
    if rule is not None:
        print(f"[skip] not a row of {cfg.experiment_name}: matches sweep.skip rule {dict(rule)}")
        return {}
    _resolve_seq_len(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    rid = run_id(config)
    out = Path(cfg.results_dir) / cfg.experiment_name / f"{rid}.json"
    if cfg.skip_existing and out.exists():
        print(f"[skip] {out} exists (same resolved config)")
        return json.loads(out.read_text())
    rev = revision_for(out)  # committed rows (paper/results) only from a clean checkout: refused now, not after the run
    seed_everything(cfg.seed)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    load_plugins(cfg.get("plugins"))
    qcfg = QuantConfig.from_dict(config["quant"])  # validate before loading anything
    tok = preflight(cfg, qcfg, out)
    t0 = time.time()
    # under `accelerate launch` / torchrun: each process its own GPU; rotation training is data-parallel,
    # everything after it (quantization, evaluation, the row) runs on the main process only
    rank, local_rank = int(os.environ.get("RANK", 0)), os.environ.get("LOCAL_RANK")
    device = f"cuda:{local_rank}" if cfg.device == "cuda" and local_rank is not None else cfg.device
    model, _ = load(cfg.model.path, dtype=DTYPES[cfg.model.dtype], device=device)

    needs_calib = qcfg.weight.enabled and get_weight_quantizer(qcfg.method).needs_hessian
    calib = rot_calib = None
    if needs_calib:
        calib = calibration_batch(tok, cfg.data.calib, cfg.data.calib_samples, cfg.data.calib_seq_len, cfg.seed,
                                  cfg.data.root)
    if cfg.rotation.name == "spinquant" and not cfg.rotation.get("load"):
        rot_calib = calibration_batch(tok, cfg.data.calib, cfg.rotation.samples + cfg.rotation.heldout,
                                      cfg.rotation.seq_len, cfg.seed, cfg.data.root)  # the last `heldout` held back
    t = time.time()
    rotation.apply(model, config["rotation"], rot_calib, target=qcfg)
    rotation_s = time.time() - t
    if rank != 0 and cfg.qat.name == "none":
        return {}
    method = {"rotation": cfg.rotation.name, "weights": qcfg.method if qcfg.weight.enabled else "none",
              "qat": cfg.qat.name}
    w = cfg.get("wandb") or {"mode": "disabled"}
    tracker = None
    if rank == 0:  # QAT training logs into this run too; the row's metrics are added when it is written
        name = "+".join(v for v in method.values() if v != "none") or "fp"
        tracker = tracking.start_run(config, w.get("mode", "offline"), w.get("project", "spinquant"),
                                     w.get("group") or cfg.experiment_name, name=f"{qcfg.label()} {name}",
                                     run_dir=w.get("dir") or Path(cfg.checkpoint_dir) / cfg.experiment_name / rid,
                                     run_id=f"{cfg.experiment_name}-{rid}")
    t = time.time()
    qat_stats = None
    if cfg.qat.name == "none":
        quantize_(model, qcfg, calib, progress=cfg.progress)
    else:  # QAT starts from the (rotated) FP model: prepare -> train -> convert; checkpoints beside the row
        tokens = tokenize_dataset(tok, cfg.qat.data, cfg.data.root, add_bos=False)[0]
        qat_stats = qat.run(model, config["qat"], qcfg, tokens, out_dir=Path(cfg.checkpoint_dir) / cfg.experiment_name / rid,
                            run_config=config)
    quant_s = time.time() - t
    if rank != 0:  # QAT trained on every process; evaluation and the row are the main process's
        return {}

    metrics: dict = {"ppl": {}, "ppl_detail": {}}
    with PeakMemory(device) as mem:
        for ds in cfg.eval.datasets:
            r = perplexity(model, tok, ds, cfg.eval.seq_len, cfg.eval.stride, cfg.eval.batch_size,
                           cfg.eval.max_windows, cfg.data.root, progress=cfg.progress)
            metrics["ppl"][ds] = r.ppl
            metrics["ppl_detail"][ds] = r.to_dict()
            print(f"  {ds}: ppl {r.ppl:.3f} ({r.tokens_scored} tokens, {r.windows} windows of {r.seq_len})")
    if cfg.eval.memory:
        metrics["peak_mem_bytes"] = mem.peak_bytes
        metrics["peak_mem_delta_bytes"] = mem.peak_delta_bytes
    if cfg.eval.size:
        sb = size_bits(model)
        metrics["size_bytes"] = sb["total_bits"] // 8
        metrics["size_on_disk_bytes"] = size_on_disk(model)
        metrics["fp16_size_bytes"] = fp16_size_bits(model) // 8
    metrics.update(wall_s=time.time() - t0, quant_s=quant_s, rotation_s=rotation_s)
    if hasattr(model, "spinquant_stats"):
        metrics["rotation_train"] = model.spinquant_stats
    if qat_stats is not None:
        metrics["qat_train"] = qat_stats
    if cfg.eval.get("lm_eval", {}).get("tasks"):
        metrics["lm_eval"] = evaluate_lm_eval(model, tok, cfg)
    if cfg.kernels.name != "none":
        metrics["packed"] = evaluate_packed(model, tok, cfg)

    w = qcfg.weight
    row = {
        "experiment": cfg.experiment_name, "run_id": rid, "model": cfg.model.name, "scheme": qcfg.label(),
        "method": method,
        "spec": {"w_bits": w.bits, "w_group": w.group_size if w.granularity == "group" else None,
                 "w_granularity": w.granularity, "w_sym": w.symmetric, "a_bits": qcfg.act.bits,
                 "kv_bits": qcfg.kv.bits, "preset": qcfg.scheme},
        "quant": qcfg.to_dict(), "metrics": metrics, "seed": cfg.seed, "git_rev": rev,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "config": config,
    }
    write_row(row, out)
    tracking.log_row(tracker, row)
    print(f"[done] {qcfg.label()} {row['method']['weights']}: {json.dumps(metrics['ppl'])} -> {out}")
    return row


def evaluate_lm_eval(model, tok, cfg: DictConfig) -> dict:
    """eval.lm_eval.tasks through lm-eval-harness on the model in memory: {task: {metric: value}}."""
    from spinquant.eval.harness import evaluate_tasks
    le = cfg.eval.lm_eval
    res = evaluate_tasks(model, tok, list(le.tasks), max_length=cfg.eval.seq_len, batch_size=le.batch_size,
                         limit=le.limit, num_fewshot=le.num_fewshot, include_defaults=le.include_defaults,
                         add_bos_token=le.add_bos_token, data_root=cfg.data.root, seed=cfg.seed)
    for task, m in res.items():
        print(f"  lm-eval {task}: " + ", ".join(f"{k} {v:.4g}" for k, v in m.items()))
    return res


def evaluate_packed(model, tok, cfg: DictConfig) -> dict:
    """Pack the quantized model onto real kernels (in place), save it, optionally reload it, and evaluate."""
    import tempfile

    from spinquant import export, kernels
    if cfg.kernels.name not in ("cpu", "triton"):
        raise ValueError(f"unknown kernels {cfg.kernels.name!r}; available: none, cpu, triton")
    if cfg.kernels.dtype not in DTYPES:
        raise ValueError(f"kernels.dtype must be one of {list(DTYPES)}, got {cfg.kernels.dtype!r}")
    t = time.time()
    kernels.pack(model, DTYPES[cfg.kernels.dtype], backend=cfg.kernels.name)
    out = {"kernels": kernels.kernel_summary(model), "dtype": cfg.kernels.dtype, "ppl": {}}
    with tempfile.TemporaryDirectory() as d:
        path = export.save(model, cfg.kernels.save or Path(d) / "packed", tok)
        out["size_on_disk_bytes"] = (path / export.WEIGHTS).stat().st_size
        if cfg.kernels.save and cfg.kernels.reload:
            model, _ = export.load(path)
            out["reloaded_from"] = str(path)
    out["pack_s"] = time.time() - t
    for ds in cfg.eval.datasets:
        r = perplexity(model, tok, ds, cfg.eval.seq_len, cfg.eval.stride, cfg.eval.batch_size, cfg.eval.max_windows,
                       cfg.data.root, progress=cfg.progress)
        out["ppl"][ds] = r.ppl
        print(f"  packed {ds}: ppl {r.ppl:.3f}")
    if cfg.eval.get("lm_eval", {}).get("tasks"):
        out["lm_eval"] = evaluate_lm_eval(model, tok, cfg)
    return out


@hydra.main(config_path="../configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
