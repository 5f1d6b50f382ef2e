"""Regenerate every committed results table at the current (clean) commit, resumably.

    python scripts/regenerate_tables.py --results-dir /tmp/regen              # every table, one run after another
    python scripts/regenerate_tables.py --results-dir /tmp/regen --tables foundation rotation --dry-run

Each table is the sweep (or script) that produced `paper/results/<table>/`, run with one thread per run into
`<results-dir>/<table>/` (rows are written atomically and a rerun skips the rows that exist, so an interrupted
regeneration resumes where it stopped). Copy a finished table into `paper/results/<table>/`, then
`python scripts/pending_rows.py` and `python scripts/make_paper.py`. Tables may run in parallel processes
(`--tables` splits them), never with more threads than cores in total.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pending_rows import TABLES as SWEPT  # noqa: E402  (table -> model -> the overrides its rows were run with)

from spinquant.results import git_rev, is_uncommitted  # noqa: E402

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
    if table == "lm_eval":
        out.append(RUN + ["-m", "+experiment=lm_eval", *common])
    if out:
        return out
    if table == "deploy":
        return [[sys.executable, str(ROOT / "scripts" / "bench_deploy.py"), "--model", m, "--out", str(results / "deploy"),
                 "--threads", "1", "--runtimes", "llama.cpp", "executorch"] for m in ("stories260k", "ref-llama")]
    raise ValueError(f"unknown table {table!r}")


TABLES = ("lm_head", "lm_eval", "foundation", "spinquant_study", "rotation", "qat", "deploy")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", type=Path, required=True)
    p.add_argument("--checkpoint-dir", type=Path, help="QAT checkpoints (default: <results-dir>/checkpoints)")
    p.add_argument("--tables", nargs="*", default=list(TABLES), choices=TABLES)
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = p.parse_args()
    print(f"regenerating {', '.join(args.tables)} at {git_rev()} into {args.results_dir}", flush=True)
    rev = git_rev()
    if is_uncommitted(rev) and not args.dry_run:
        p.error(f"the checkout is {rev}: one commit's tables come from a clean checkout; commit or stash first")
    results = args.results_dir.resolve()
    checkpoints = (args.checkpoint_dir or results / "checkpoints").resolve()
    for table in args.tables:
        for cmd in commands(table, results, checkpoints):
            print(f"[{table}] {shlex.join(cmd)}", flush=True)
            if not args.dry_run:
                subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


if __name__ == "__main__":
    main()
