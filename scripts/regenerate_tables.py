"""Regenerate every committed results table at the current (clean) commit, resumably.

    python scripts/regenerate_tables.py --results-dir /tmp/regen              # every table, one run after another
    python scripts/regenerate_tables.py --results-dir /tmp/regen --jobs 8     # 8 runs at a time (one thread each)
    python scripts/regenerate_tables.py --results-dir /tmp/regen --tables foundation rotation --dry-run
    python scripts/regenerate_tables.py --results-dir /tmp/regen --tables rotation --exclude rotation=spinquant

Each table is the sweep (or script) that produced `paper/results/<table>/`, expanded into its single runs (one
row each) and run with one thread per run into `<results-dir>/<table>/`. Rows are written atomically and a run
whose row exists is skipped, so an interrupted regeneration resumes where it stopped (QAT also from its
checkpoint). `--jobs N` runs N of them at a time (at most the number of cores), each logging to
`<results-dir>/logs/`. Copy a finished table into `paper/results/<table>/`, then `python scripts/pending_rows.py`
and `python scripts/make_paper.py`.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pending_rows import TABLES as SWEPT  # noqa: E402  (table -> model -> the overrides its rows were run with)

from spinquant.results import git_rev, is_uncommitted, row_path  # noqa: E402
from spinquant.sweeps import is_sweep, split_override, sweep_jobs  # noqa: E402

RUN = [sys.executable, str(ROOT / "experiments" / "run.py")]
LM_HEAD_ACT = ["++quant.embed.bits=8", "++quant.lm_head_act.bits=8", "++quant.lm_head_act.symmetric=false",
               "++quant.lm_head_act.granularity=token", "++quant.lm_head_act.dynamic=true"]
LM_HEAD_INT4 = ["++quant.lm_head.bits=4", "++quant.lm_head.granularity=group", "++quant.lm_head.group_size=32",
                "++quant.lm_head.clip_search=mse"]


def commands(table: str, results: Path, checkpoints: Path) -> list[list[str]]:
    """The runs that produce one committed table."""
    common = ["threads=1", "progress=false", f"results_dir={results}", f"checkpoint_dir={checkpoints}"]
    if table == "lm_head":  # the int8 and int4 lm_head beside each other (W4A8 RTN, int8 embedding)
        out = []
        for model in (["model=stories260k", "quant.group_fallback=channel"], ["model=ref-llama"]):
            for head in (["++quant.lm_head.bits=8"], LM_HEAD_INT4):
                out.append(RUN + [*model, "quant=w4a8", *LM_HEAD_ACT, *head, "experiment_name=lm_head",
                                  "eval.datasets=[wikitext2]", *common])
        return out
    out = [RUN + ["-m", f"+experiment={table}", f"model={model}", *extra, *common]
           for model, extra in SWEPT.get(table, {}).items()]  # the swept tables, as pending_rows.py resolves them
    if table == "spinquant_study":  # on ref-llama only the setting the stories260K grid chose
        out.append(RUN + ["-m", "+experiment=spinquant_study", "model=ref-llama", "rotation=spinquant", "rotation.lr=0.5",
                          "rotation.steps=100", "rotation.batch_size=8", *common])
    if out:
        return out
    if table == "deploy":
        return [[sys.executable, str(ROOT / "scripts" / "bench_deploy.py"), "--model", m, "--out", str(results / "deploy"),
                 "--threads", "1", "--runtimes", "llama.cpp", "executorch"] for m in ("stories260k", "ref-llama")]
    raise ValueError(f"unknown table {table!r}")


def single_runs(cmd: list[str]) -> list[tuple[list[str], Path | None]]:
    """A `run.py -m` sweep command as its single runs, each with the row file it writes (the jobs Hydra would run,
    less those its sweep.skip rules drop); any other command as it is, with None."""
    if cmd[:len(RUN)] != RUN:
        return [(cmd, None)]
    overrides = [a for a in cmd[len(RUN):] if a != "-m"]
    if "-m" not in cmd:
        from hydra import compose, initialize_config_dir
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        return [(cmd, _row_file(cfg))]
    experiment = next(split_override(a)[1] for a in overrides if split_override(a)[0] == "experiment")
    rest = [a for a in overrides if split_override(a)[0] != "experiment"]
    fixed = [a for a in rest if not is_sweep(split_override(a)[1])]
    out = []
    for choices, cfg in sweep_jobs(ROOT / "configs", experiment, *rest)[0]:
        out.append((RUN + [f"+experiment={experiment}", *fixed, *(f"{k}={v}" for k, v in choices.items())],
                    _row_file(cfg)))
    return out


def _row_file(cfg) -> Path:
    """Where pipeline.run writes a composed config's row: results_dir/experiment_name/<run id>.json."""
    from omegaconf import OmegaConf
    return row_path(cfg.results_dir, cfg.experiment_name, OmegaConf.to_container(cfg, resolve=True))


def _run(cmd: list[str], log: Path | None) -> tuple[int, float]:
    t0 = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if log is None:
        rc = subprocess.run(cmd, env=env).returncode
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    return rc, time.time() - t0


TABLES = ("lm_head", "lm_eval", "foundation", "spinquant_study", "rotation", "qat", "deploy")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", type=Path, required=True)
    p.add_argument("--checkpoint-dir", type=Path, help="QAT checkpoints (default: <results-dir>/checkpoints)")
    p.add_argument("--tables", nargs="*", default=list(TABLES), choices=TABLES)
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, one thread each (default 1)")
    p.add_argument("--exclude", nargs="*", default=[], metavar="KEY=VALUE",
                   help="leave out the runs with any of these overrides (e.g. rotation=spinquant: the costly rows later; "
                        "'rotation=quarot quant=w4a16_gptq', quoted: the runs with all of them)")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = p.parse_args()
    cores = os.cpu_count() or 1
    if not 1 <= args.jobs <= cores:
        p.error(f"--jobs {args.jobs}: between 1 and the {cores} cores here (every run takes one thread)")
    rev = git_rev()
    if is_uncommitted(rev) and not args.dry_run:
        p.error(f"the checkout is {rev}: one commit's tables come from a clean checkout; commit or stash first")
    results = args.results_dir.resolve()
    checkpoints = (args.checkpoint_dir or results / "checkpoints").resolve()
    print(f"regenerating {', '.join(args.tables)} at {rev} into {results}", flush=True)
    todo = []
    for table in args.tables:
        for cmd in commands(table, results, checkpoints):
            for run, row in single_runs(cmd):
                done = row is not None and row.exists()
                left_out = any(all(t in run for t in x.split()) for x in args.exclude)
                print(f"[{table}] {shlex.join(run)}" + ("  (row exists)" if done else "  (--exclude)" if left_out else ""),
                      flush=True)
                if not done and not left_out:
                    todo.append((table, run, row))
    if args.dry_run or not todo:
        return
    print(f"{len(todo)} runs to do, {args.jobs} at a time", flush=True)
    failed = []
    with ThreadPoolExecutor(args.jobs) as pool:
        logs = [None if args.jobs == 1 else
                results / "logs" / f"{table}-{row.stem if row else i}.log" for i, (table, _, row) in enumerate(todo)]
        futures = {pool.submit(_run, run, log): (table, run, log) for (table, run, _), log in zip(todo, logs)}
        for n, fut in enumerate(as_completed(futures), 1):
            (table, run, log), (rc, secs) = futures[fut], fut.result()
            what = " ".join(a for a in run[len(RUN):] if "_dir=" not in a) if run[:len(RUN)] == RUN else shlex.join(run)
            status = "done" if rc == 0 else f"FAILED (exit {rc}" + (f", log {log})" if log else ")")
            print(f"[{table}] {n}/{len(todo)} {status} in {secs:.0f} s: {what}", flush=True)
            if rc:
                failed.append(shlex.join(run))
    if failed:
        sys.exit(f"{len(failed)} run(s) failed:\n" + "\n".join(failed))


if __name__ == "__main__":
    main()
