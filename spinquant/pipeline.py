"""The main job as a library: a typed run configuration and `run(config) -> row`.

    cfg = RunConfig.from_dict({"model": {"name": "ref-llama", "path": "ref-llama"}, "quant": {"scheme": "W4A8"}})
    row = run(cfg)                      # load -> rotate -> quantize (or QAT) -> evaluate -> (pack) -> one results row

Each section is a small dataclass whose fields are the keys of its Hydra group (`configs/<group>/*.yaml`): a key
that is not a field is refused (a misspelled `++eval.max_window=2` would otherwise do nothing). The steps are the
public functions `load_model`, `rotation.apply`, `quantize_`, `evaluate`, `pack_and_evaluate`; the row keeps the
resolved config dict it was given (its run id is computed from that dict).
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
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from . import qat, rotation, tracking
from .data import calibration_batch, dataset_path, tokenize_dataset
from .eval import PeakMemory, fp16_size_bits, perplexity, size_bits, size_on_disk
from .models import load
from .models.load import check_device, load_config, load_tokenizer
from .models.state import state_of
from .quant import QuantConfig, get_weight_quantizer, quantize_
from .quant.apply import check_config_shapes
from .results import revision_for, row_path, write_row
from .typed import from_fields
from .writes import check_dir, check_file

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    name: str = "ref-llama"       # shown in tables
    path: str = "ref-llama"       # a short name (ref-llama, stories260k), a local HF folder, or (online) a hub id
    dtype: str = "float32"
    seq_len: int | None = 512     # evaluation / calibration window; None: min(2048, max_position_embeddings)


@dataclass
class DataConfig:
    root: str | None = None       # None: $SPINQUANT_DATA, else ../shared/data, else ~/.cache/spinquant/data
    calib: str = "wikitext2-train"
    calib_samples: int = 128
    calib_seq_len: int | None = None  # None: model.seq_len


@dataclass
class LMEvalConfig:
    tasks: list = field(default_factory=list)
    include_defaults: bool = False
    batch_size: int = 4
    limit: int | None = None
    num_fewshot: int | None = None
    add_bos_token: bool | None = False


@dataclass
class EvalConfig:
    datasets: list = field(default_factory=lambda: ["wikitext2", "wikitext2-tok", "python-docs"])
    seq_len: int | None = None    # None: model.seq_len
    stride: int | None = None     # None: seq_len (non-overlapping windows)
    batch_size: int = 4
    max_windows: int | None = None  # windows per dataset (quick runs); None: the whole test set
    size: bool = True
    memory: bool = True
    kld: bool = True              # KL divergence to the FP model and top-1 agreement, on the perplexity's windows
    lm_eval: LMEvalConfig = field(default_factory=LMEvalConfig)

    def __post_init__(self):
        self.lm_eval = from_fields(LMEvalConfig, self.lm_eval, "eval.lm_eval")
        for k in ("max_windows", "seq_len", "stride", "batch_size"):
            v = getattr(self, k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"eval.{k} must be a positive integer{' or null' if k != 'batch_size' else ''}, "
                                 f"got {v!r}" + (" (null scores every window)" if k == "max_windows" else ""))


@dataclass
class KernelsConfig:
    name: str = "none"            # none | cpu | triton
    dtype: str = "bfloat16"
    save: str | None = None       # folder: save the packed model there
    reload: bool = True           # with save: evaluate the model loaded back from it

    def __post_init__(self):
        if self.name not in ("none", "cpu", "triton"):
            raise ValueError(f"unknown kernels {self.name!r}; available: none, cpu, triton")
        if self.dtype not in DTYPES:
            raise ValueError(f"kernels.dtype must be one of {list(DTYPES)}, got {self.dtype!r}")


@dataclass
class QATRunConfig:
    name: str = "none"            # none | full | lora
    scales: str = "fixed"
    lora: dict = field(default_factory=dict)
    merge: bool = False
    data: str = "wikitext2-train"
    train: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.name not in qat.METHODS:
            raise ValueError(f"unknown qat method {self.name!r}; available: {', '.join(qat.METHODS)}")
        from_fields(qat.TrainConfig, {**self.train, "seq_len": 1}, "qat.train")
        unknown = sorted(set(self.lora) - {"rank", "alpha", "dropout", "targets", "qa_lora"})
        if unknown:
            raise ValueError(f"unknown config key(s) {', '.join('qat.lora.' + k for k in unknown)}")


@dataclass
class WandbConfig:
    mode: str = "disabled"        # offline | online | disabled
    project: str = "spinquant"
    group: str | None = None
    dir: str | None = None


@dataclass
class RunConfig:
    """One run. `raw`: the resolved config dict the row records and its run id hashes (the Hydra config for
    Hydra runs; `to_dict()` for configs built in Python)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rotation: object = field(default_factory=rotation.NoRotation)
    quant: QuantConfig = field(default_factory=QuantConfig)
    qat: QATRunConfig = field(default_factory=QATRunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    experiment_name: str = "default"
    seed: int = 0
    device: str = "cpu"
    results_dir: str = "results"
    checkpoint_dir: str = "checkpoints"
    skip_existing: bool = True
    progress: bool = True
    threads: int | None = None
    plugins: list = field(default_factory=list)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    sweep: dict = field(default_factory=dict)
    raw: dict | None = field(default=None, repr=False)

    def __post_init__(self):
        if isinstance(self.model, (str, os.PathLike)):  # a short name or a folder, as sq.load_model takes
            self.model = ModelConfig(name=Path(self.model).name if os.sep in str(self.model) else str(self.model),
                                     path=str(self.model))
        self.model = from_fields(ModelConfig, self.model, "model")
        self.data = from_fields(DataConfig, self.data, "data")
        self.rotation = rotation.rotation_config(self.rotation)
        # one rule, from Python as from Hydra (whose configs interpolate ${seed}, ${progress} and ${model.seq_len}):
        # a section's seed, progress or seq_len left unset (None, or absent from qat.train) is the run's
        run = {"seed": self.seed, "progress": self.progress, "seq_len": self.model.seq_len}
        self.rotation = replace(self.rotation, **{k: v for k, v in run.items()
                                                  if hasattr(self.rotation, k) and getattr(self.rotation, k) is None})
        if isinstance(self.quant, str):  # a scheme name, e.g. "W4A8"
            self.quant = QuantConfig(scheme=self.quant)
        if not isinstance(self.quant, QuantConfig):
            self.quant = QuantConfig.from_dict(dict(self.quant or {}))
        self.qat = from_fields(QATRunConfig, self.qat, "qat")
        if self.qat.name != "none":
            self.qat = replace(self.qat, train={**self.qat.train, **{k: v for k, v in run.items()
                                                                     if self.qat.train.get(k) is None}})
        self.eval = from_fields(EvalConfig, self.eval, "eval")
        self.kernels = from_fields(KernelsConfig, self.kernels, "kernels")
        self.wandb = from_fields(WandbConfig, self.wandb, "wandb")
        if self.model.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {list(DTYPES)}, got {self.model.dtype!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """From a resolved (Hydra) dict; plugins are imported first, since they may register rotations or
        quantizers the dict names."""
        d = dict(d)
        load_plugins(d.get("plugins"))
        known = {f.name for f in fields(cls)} - {"raw"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; a run takes: {', '.join(sorted(known))}")
        return cls(**d, raw=json.loads(json.dumps(d)))

    def to_dict(self) -> dict:
        if self.raw is not None:
            return self.raw
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "raw"}
        d["quant"] = self.quant.to_dict()
        return json.loads(json.dumps({k: asdict(v) if hasattr(v, "__dataclass_fields__") else v for k, v in d.items()}))


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


def resolve_seq_len(model_path: str) -> int:
    """model.seq_len None: the model's context, capped at the papers' 2048, said out loud."""
    ctx = getattr(load_config(model_path), "max_position_embeddings", None) or 2048
    n = min(2048, ctx)
    print(f"[note] model.seq_len=null: evaluating and calibrating at {n} tokens "
          f"(min(2048, max_position_embeddings={ctx})); set model.seq_len to choose")
    return n


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


def _lengths(cfg: RunConfig) -> tuple[int, int]:
    """(eval seq_len, calibration seq_len), defaulting to model.seq_len."""
    if cfg.model.seq_len is None:
        cfg.model.seq_len = resolve_seq_len(cfg.model.path)
    return cfg.eval.seq_len or cfg.model.seq_len, cfg.data.calib_seq_len or cfg.model.seq_len


def _rotation_len(cfg: RunConfig) -> int:
    """SpinQuant's training sequence length: rotation.seq_len, else the calibration length."""
    return cfg.rotation.seq_len or _lengths(cfg)[1]


def preflight(cfg: RunConfig, out: Path | None):
    """Everything checkable before the model's weights are read (and before GPTQ / SpinQuant / QAT run), so a
    bad config fails in seconds: device, results folder (`out`: the row's path; None for an export, whose target
    its caller checks), model family and tokenizer, group sizes and overrides against every layer the config
    quantizes (from config.json), eval length against the model's context, every dataset present and at least one
    window long. Returns the tokenizer."""
    qcfg = cfg.quant
    check_device(cfg.device)
    if out is not None:
        _check_writable(out.parent)
    if cfg.kernels.save:
        from .export import FORMAT
        check_dir(cfg.kernels.save, FORMAT, what="packed model folder (kernels.save)")
    get_weight_quantizer(qcfg.method)  # unknown method (a plugin not loaded?): a clear error now, not after loading
    eval_len, calib_len = _lengths(cfg)
    mconf = load_config(cfg.model.path)
    check_config_shapes(mconf, qcfg)
    ctx = getattr(mconf, "max_position_embeddings", None)
    if ctx and eval_len > ctx:
        raise ValueError(f"eval.seq_len={eval_len} exceeds the model's context (max_position_embeddings="
                         f"{ctx}); set model.seq_len (or eval.seq_len) to at most {ctx}")
    tok = load_tokenizer(cfg.model.path)
    root = cfg.data.root
    for ds in cfg.eval.datasets:
        _check_long_enough(tok, ds, root, eval_len, "eval dataset")
    if qcfg.weight.enabled and get_weight_quantizer(qcfg.method).needs_hessian:
        _check_long_enough(tok, cfg.data.calib, root, calib_len + 2, "calibration text")
    rot = cfg.rotation
    if rot.name == "spinquant" and not rot.load:
        from .rotation.spinquant import check_config
        check_config(asdict(rot), int(os.environ.get("WORLD_SIZE", 1)), target=qcfg)
        _check_long_enough(tok, cfg.data.calib, root, _rotation_len(cfg) + 2, "calibration text")
    if cfg.qat.name != "none":
        dataset_path(cfg.qat.data, root)
    if cfg.qat.name == "lora":
        _check_lora_ranks(mconf, qcfg, cfg.qat.lora)
    le = cfg.eval.lm_eval
    if le.tasks:
        from .eval.harness import check_tasks
        check_tasks(list(le.tasks), le.include_defaults, root)
    return tok


def _check_lora_ranks(mconf, qcfg: QuantConfig, lora: dict) -> None:
    """QAT+LoRA's rank against every targeted linear's width, from config.json: QA-LoRA pools each weight group into
    one input, so its rank is at most in_features / group_size (1 for per-channel weights)."""
    from .models.adapter import adapter_for_model_type
    a = adapter_for_model_type(mconf.model_type)
    rank, qa = int(lora.get("rank", 16)), bool(lora.get("qa_lora", False))
    targets = lora.get("targets") or ["q", "k", "v", "o", "gate", "up", "down"]
    widths = a.linear_in_features(mconf)
    for role in targets:
        n = widths[role]
        specs = qcfg.specs_for(f"{a.layers}.0.{a.linear_names()[role]}", n)
        w = specs[0] if specs is not None else None
        a_in = n // (w.group_size if w.granularity == "group" else n) if qa and w is not None and w.enabled else n
        if rank > a_in:
            why = f" (QA-LoRA pools each group of {n // a_in} inputs)" if qa else ""
            raise ValueError(f"qat.lora.rank={rank} exceeds the {a_in} inputs of {role}_proj's adapter{why}; set "
                             f"qat.lora.rank to at most {a_in}")


def load_model(cfg: ModelConfig, device: str = "cpu"):
    """(model, tokenizer) for `cfg` (a ModelConfig or a name / path)."""
    if isinstance(cfg, str):
        cfg = ModelConfig(name=cfg, path=cfg)
    return load(cfg.path, dtype=DTYPES[cfg.dtype], device=device)


def evaluate(model, tok, cfg: EvalConfig, data_root=None, progress: bool = True, seq_len: int | None = None,
             reference=None) -> dict:
    """Perplexity on every eval dataset: {"ppl": {ds: ppl}, "ppl_detail": {ds: PerplexityResult dict}}; with
    `reference` (the FP model) also {"kld": {ds: KLDResult dict}}: KL(FP ‖ model) and top-1 agreement on the same
    windows."""
    seq_len = cfg.seq_len or seq_len
    if seq_len is None:
        raise ValueError("evaluate needs eval.seq_len (or seq_len=)")
    out: dict = {"ppl": {}, "ppl_detail": {}}
    for ds in cfg.datasets:
        r = perplexity(model, tok, ds, seq_len, cfg.stride, cfg.batch_size, cfg.max_windows, data_root,
                       progress=progress, reference=reference)
        out["ppl"][ds] = r.ppl
        out["ppl_detail"][ds] = {k: v for k, v in r.to_dict().items() if k != "kld"}
        line = f"  {ds}: ppl {r.ppl:.3f} ({r.tokens_scored} tokens, {r.windows} windows of {r.seq_len})"
        if r.kld is not None:
            out.setdefault("kld", {})[ds] = r.kld.to_dict()
            line += f", KLD to FP {r.kld.mean:.5f} (p99 {r.kld.p99:.4f}), same top-1 {100 * r.kld.top1:.2f}%"
        print(line)
    return out


def evaluate_run(model, tok, cfg: "RunConfig", device: str = "cpu") -> tuple[dict, "PeakMemory | None"]:
    """A run's evaluation: (evaluate's output, with "kld" when eval.kld; the PeakMemory of the perplexity pass when
    eval.memory). The FP checkpoint for the KL divergence is loaded afresh; when memory is measured it scores in a
    pass of its own after the measured one (so the row's memory is the evaluated model's alone), otherwise the
    model's logits are computed once for both."""
    eval_len = _lengths(cfg)[0]
    if not cfg.eval.memory:
        reference = load_model(cfg.model, device)[0] if cfg.eval.kld else None
        return evaluate(model, tok, cfg.eval, cfg.data.root, cfg.progress, eval_len, reference=reference), None
    with PeakMemory(device) as mem:
        out = evaluate(model, tok, cfg.eval, cfg.data.root, cfg.progress, eval_len)
    if cfg.eval.kld:
        print("  KL divergence to the FP model:")
        reference = load_model(cfg.model, device)[0]
        out["kld"] = evaluate(model, tok, cfg.eval, cfg.data.root, cfg.progress, eval_len, reference=reference)["kld"]
    return out, mem


def evaluate_lm_eval(model, tok, cfg: RunConfig) -> dict:
    """eval.lm_eval.tasks through lm-eval-harness on the model in memory: {task: {metric: value}}."""
    from .eval.harness import evaluate_tasks
    le = cfg.eval.lm_eval
    res = evaluate_tasks(model, tok, list(le.tasks), max_length=_lengths(cfg)[0], batch_size=le.batch_size,
                         limit=le.limit, num_fewshot=le.num_fewshot, include_defaults=le.include_defaults,
                         add_bos_token=le.add_bos_token, data_root=cfg.data.root, seed=cfg.seed)
    for task, m in res.items():
        print(f"  lm-eval {task}: " + ", ".join(f"{k} {v:.4g}" for k, v in m.items()))
    return res


def pack_and_evaluate(model, tok, cfg: RunConfig) -> dict:
    """Pack the quantized model onto real kernels (in place), save it, optionally reload it, and evaluate."""
    from . import export, kernels
    kc = cfg.kernels
    t = time.time()
    kernels.pack(model, DTYPES[kc.dtype], backend=kc.name)
    out = {"kernels": kernels.kernel_summary(model), "dtype": kc.dtype, "ppl": {}}
    with tempfile.TemporaryDirectory() as d:
        path = export.save(model, kc.save or Path(d) / "packed", tok)
        out["size_on_disk_bytes"] = (path / export.WEIGHTS).stat().st_size
        if kc.save and kc.reload:
            model, _ = export.load(path)
            out["reloaded_from"] = str(path)
    out["pack_s"] = time.time() - t
    res = evaluate(model, tok, cfg.eval, cfg.data.root, cfg.progress, _lengths(cfg)[0])
    for ds, ppl in res["ppl"].items():
        out["ppl"][ds] = ppl
        print(f"  packed {ds}: ppl {ppl:.3f}")
    if cfg.eval.lm_eval.tasks:
        out["lm_eval"] = evaluate_lm_eval(model, tok, cfg)
    return out


def run(cfg: RunConfig | dict) -> dict:
    """One run -> one row (written to results_dir/experiment_name/<run id>.json atomically, and returned). A row
    that exists for the same resolved config is returned without running (skip_existing)."""
    cfg = cfg if isinstance(cfg, RunConfig) else RunConfig.from_dict(cfg)
    config = cfg.to_dict()
    out = row_path(cfg.results_dir, cfg.experiment_name, config)
    rid = out.stem
    if cfg.skip_existing and out.exists():
        print(f"[skip] {out} exists (same resolved config)")
        return json.loads(out.read_text())
    rev = revision_for(out)  # committed rows (paper/results) only from a clean checkout: refused now, not after the run
    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    qcfg = cfg.quant
    tok = preflight(cfg, out)
    t0 = time.time()
    rank = int(os.environ.get("RANK", 0))
    method = {"rotation": rotation_label(cfg.rotation), "weights": qcfg.method if qcfg.weight.enabled else "none",
              "qat": cfg.qat.name}
    tracker = None
    if rank == 0:  # QAT training logs into this run too; the row's metrics are added when it is written
        w = cfg.wandb
        name = "+".join(v for v in method.values() if v != "none") or "fp"
        tracker = tracking.start_run(config, w.mode, w.project, w.group or cfg.experiment_name,
                                     name=f"{qcfg.label()} {name}",
                                     run_dir=w.dir or Path(cfg.checkpoint_dir) / cfg.experiment_name / rid,
                                     run_id=f"{cfg.experiment_name}-{rid}")
    model, device, rotation_s, quant_s, qat_stats = build_quantized(cfg, tok, rid)
    if model is None or rank != 0:  # QAT trained on every process; evaluation and the row are the main process's
        return {}

    metrics, mem = evaluate_run(model, tok, cfg, device)
    if mem is not None:
        metrics["peak_mem_bytes"] = mem.peak_bytes
        metrics["peak_mem_delta_bytes"] = mem.peak_delta_bytes
    if cfg.eval.size:
        sb = size_bits(model)
        metrics["size_bytes"] = sb["total_bits"] // 8
        metrics["size_on_disk_bytes"] = size_on_disk(model)
        metrics["fp16_size_bytes"] = fp16_size_bits(model) // 8
    metrics.update(wall_s=time.time() - t0, quant_s=quant_s, rotation_s=rotation_s)
    metrics.update(rotation_train_metrics(model))
    if qat_stats is not None:
        metrics["qat_train"] = qat_stats
    if cfg.eval.lm_eval.tasks:
        metrics["lm_eval"] = evaluate_lm_eval(model, tok, cfg)
    if cfg.kernels.name != "none":
        metrics["packed"] = pack_and_evaluate(model, tok, cfg)

    row = make_row(cfg, rid, method, metrics, rev)
    write_row(row, out)
    tracking.log_row(tracker, row)
    print(f"[done] {qcfg.label()} {row['method']['weights']}: {json.dumps(metrics['ppl'])} -> {out}")
    return row


def rotation_label(rot) -> str:
    """The rotation's name in rows and tables; `<name>-offline` when it fuses R1/R2 only (no online R3/R4)."""
    if hasattr(rot, "r3") and not rot.r3 and not getattr(rot, "r4", True):
        return f"{rot.name}-offline"
    return rot.name


def rotation_train_metrics(model) -> dict:
    """{"rotation_train": stats} for a model whose rotation was learned (held-back objective before/after, losses),
    else {}: what a row records about the rotation training behind it."""
    rot = state_of(model).rotation
    stats = rot.stats if rot is not None else {}
    return {"rotation_train": stats} if stats else {}


def build_quantized(cfg: RunConfig, tok, rid: str = "export"):
    """load -> rotate -> quantize (or QAT: prepare, train, convert) as `cfg` says. Returns (model, device,
    rotation seconds, quantization seconds, QAT stats or None); model None on a non-main process of a
    data-parallel rotation run without QAT (it has nothing left to do)."""
    qcfg, rot = cfg.quant, cfg.rotation
    _, calib_len = _lengths(cfg)
    # under `accelerate launch` / torchrun: each process its own GPU; rotation training is data-parallel,
    # everything after it (quantization, evaluation, the row) runs on the main process only
    rank, local_rank = int(os.environ.get("RANK", 0)), os.environ.get("LOCAL_RANK")
    device = f"cuda:{local_rank}" if cfg.device == "cuda" and local_rank is not None else cfg.device
    model, _ = load_model(cfg.model, device)
    calib = rot_calib = None
    if qcfg.weight.enabled and get_weight_quantizer(qcfg.method).needs_hessian:
        calib = calibration_batch(tok, cfg.data.calib, cfg.data.calib_samples, calib_len, cfg.seed, cfg.data.root)
    if rot.name == "spinquant" and not rot.load:
        rot_calib = calibration_batch(tok, cfg.data.calib, rot.samples + rot.heldout, _rotation_len(cfg), cfg.seed,
                                      cfg.data.root)  # the last `heldout` held back
    t = time.time()
    rotation.apply(model, rot, rot_calib, target=qcfg)
    rotation_s = time.time() - t
    if rank != 0 and cfg.qat.name == "none":
        return None, device, rotation_s, 0.0, None
    t = time.time()
    qat_stats = None
    if cfg.qat.name == "none":
        quantize_(model, qcfg, calib, progress=cfg.progress)
    else:  # QAT starts from the (rotated) FP model: prepare -> train -> convert; checkpoints beside the row
        config = cfg.to_dict()
        if config["qat"]["train"].get("seq_len") is None:  # model.seq_len null: the length it resolved to
            config["qat"]["train"]["seq_len"] = _lengths(cfg)[1]
        tokens = tokenize_dataset(tok, cfg.qat.data, cfg.data.root, add_bos=False)[0]
        qat_stats = qat.run(model, config["qat"], qcfg, tokens, out_dir=Path(cfg.checkpoint_dir) / cfg.experiment_name / rid,
                            run_config=config)
    return model, device, rotation_s, time.time() - t, qat_stats


def _quantized_for_export(cfg: RunConfig | dict, check_target, check_config=None):
    """(config, quantized model, tokenizer) for an export: the target path's checks (`check_target()`), the format's
    refusals from the config (`check_config(quant, rotation, qat)`), then the run's preflight, all before the model
    is loaded and quantized."""
    cfg = cfg if isinstance(cfg, RunConfig) else RunConfig.from_dict(cfg)
    check_target()
    if check_config is not None:
        check_config(cfg.quant, cfg.rotation, cfg.qat)
    seed_everything(cfg.seed)
    tok = preflight(cfg, None)
    return cfg, build_quantized(cfg, tok)[0], tok


def export_compressed_tensors_run(cfg: RunConfig | dict, out, overwrite: bool = False) -> Path:
    """Quantize as `cfg` says and write a compressed-tensors checkpoint folder `out` (transformers / vLLM load it).
    Everything the format cannot hold here is refused from the config, before the model loads."""
    from .ct_export import WRITER, check_config, export_compressed_tensors
    cfg, model, tok = _quantized_for_export(cfg, lambda: check_dir(out, WRITER, overwrite), check_config)
    return export_compressed_tensors(model, out, tok, overwrite=overwrite)


def export_gguf_run(cfg: RunConfig | dict, out, overwrite: bool = False) -> Path:
    """Quantize as `cfg` says and write the GGUF file `out` for llama.cpp (weights bit-exact; see gguf_export).
    Everything GGUF cannot hold is refused from the config, before the model loads."""
    from .gguf_export import WRITER, check_config, export_gguf, is_gguf
    from .models.load import resolve_path
    cfg, model, _ = _quantized_for_export(cfg, lambda: check_file(out, WRITER, is_gguf, overwrite, "GGUF file"),
                                          check_config)
    return export_gguf(model, out, resolve_path(cfg.model.path), name=cfg.model.name, overwrite=overwrite)


def export_executorch_run(cfg: RunConfig | dict, out, overwrite: bool = False) -> Path:
    """Quantize as `cfg` says and write the ExecuTorch program `out` (.pte, XNNPACK; see et_export) with a static KV
    cache of the eval length. Everything the program cannot hold is refused from the config, before the model loads."""
    from .et_export import WRITER, check_config, export_executorch, is_pte
    cfg, model, _ = _quantized_for_export(
        cfg, lambda: check_file(out, WRITER, is_pte, overwrite, "ExecuTorch program"), check_config)
    return export_executorch(model, out, max_seq_len=_lengths(cfg)[0], overwrite=overwrite)


def export_packed(cfg: RunConfig | dict, out, overwrite: bool = False) -> Path:
    """Quantize as `cfg` says, pack onto `cfg.kernels` (cpu when none) and save the folder `out` (weights,
    metadata, tokenizer). No evaluation. A folder holding other files is refused unless `overwrite`."""
    from . import export, kernels
    cfg, model, tok = _quantized_for_export(cfg, lambda: check_dir(out, export.FORMAT, overwrite))
    backend = cfg.kernels.name if cfg.kernels.name != "none" else "cpu"
    kernels.pack(model, DTYPES[cfg.kernels.dtype], backend=backend)
    return export.save(model, out, tok, overwrite=overwrite)


def make_row(cfg: RunConfig, rid: str, method: dict, metrics: dict, rev: str) -> dict:
    """The results row: what ran (resolved quant config included), its metrics, seed, revision and threads."""
    qcfg = cfg.quant
    w = qcfg.weight
    return {
        "experiment": cfg.experiment_name, "run_id": rid, "model": cfg.model.name, "scheme": qcfg.label(),
        "method": method,
        "spec": {"w_bits": w.bits, "w_group": w.group_size if w.granularity == "group" else None,
                 "w_granularity": w.granularity, "w_sym": w.symmetric, "a_bits": qcfg.act.bits,
                 "kv_bits": qcfg.kv.bits, "preset": qcfg.scheme},
        "quant": qcfg.to_dict(), "metrics": metrics, "seed": cfg.seed, "git_rev": rev,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "config": cfg.to_dict(),
    }
