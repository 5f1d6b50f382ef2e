"""The jobs of each committed table's sweep that have no committed row yet: paper/results/pending.json.

    python scripts/pending_rows.py            # rewrite paper/results/pending.json from the sweeps and the rows
    python scripts/pending_rows.py --check    # exit 1 if it is out of date

The sweep tests (tests/test_sweeps.py) hold every table to its sweep minus this list, so a row that goes
missing, or a committed row that today's code would not produce, fails the suite.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from spinquant.results import run_id  # noqa: E402
from spinquant.sweeps import sweep_jobs  # noqa: E402

# smollm2-135m's reduced protocol on 2 CPU cores (its full test sets cost ~40 min per row, GPTQ's 128 calibration
# sequences ~16 min): the first 16 windows of 512 tokens of WikiText-2 and of the held-out domain (python-docs), KL
# divergence to FP on the same windows, no memory pass, 32 calibration sequences of 512 tokens (GPTQ: 128 x 2048)
SMOLLM2 = ["eval.max_windows=16", "eval.datasets=[wikitext2,python-docs]", "eval.memory=false", "data.calib_samples=32"]
# SpinQuant's official 100 steps of 8 cost ~2 h per smollm2 row here: its rows use the labelled reduced recipe
# (rotation/spinquant_reduced.yaml); QAT trains 8 steps of 4 sequences (16K tokens; one step ~60 s) at W4A8 and W4A4KV4
SMOLLM2_ROTATIONS = "rotation=none,quarot,quarot_offline,spinquant_reduced"
QAT_REDUCED = ["qat.train.steps=8", "qat.train.batch_size=4"]  # also bench_deploy.py --reduced
SMOLLM2_QAT = ["quant=w16a16,w4a8,w4a8_gptq,w4a4kv4,w4a4kv4_gptq", "rotation=none,spinquant_reduced", *QAT_REDUCED]
# table -> model -> the extra overrides its committed rows were run with (the sweep file's header says which)
TABLES = {"foundation": {"smollm2-135m": SMOLLM2, "ref-llama": [], "stories260k": ["quant.group_fallback=channel"]},
          "rotation": {"smollm2-135m": [*SMOLLM2, SMOLLM2_ROTATIONS], "ref-llama": [], "stories260k": []},
          "qat": {"smollm2-135m": [*SMOLLM2, *SMOLLM2_QAT], "ref-llama": []},
          "spinquant_study": {"stories260k": []},
          # lm-eval's document-level rolling loglikelihood reads whole WikiText-2 articles (~3.6K tokens each): 8 of
          # the 62 on smollm2-135m
          "lm_eval": {"smollm2-135m": [*SMOLLM2, "eval.lm_eval.limit=8"], "ref-llama": []}}
WHY = ("Jobs of a committed table's sweep that have no committed row yet (new configurations such as W4A8-mixed, or "
       "rows removed to be regenerated), by table and model; `spinquant sweep +experiment=<table> results_dir="
       "paper/results` from a clean checkout computes exactly these.")


def pending() -> dict:
    out = {"why": WHY, "tables": {}}
    for table, models in TABLES.items():
        for model, extra in models.items():
            committed = {p.stem for p in (ROOT / "paper/results" / table).glob("*.json")
                         if json.loads(p.read_text())["model"] == model}
            jobs, _ = sweep_jobs(ROOT / "configs", table, f"model={model}", *extra)
            miss = {run_id(OmegaConf.to_container(c, resolve=True)): " ".join(f"{k}={v}" for k, v in sorted(ch.items()))
                    for ch, c in jobs}
            miss = {k: v for k, v in sorted(miss.items()) if k not in committed}
            if miss:
                out["tables"].setdefault(table, {})[model] = miss
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true")
    args = p.parse_args(argv)
    path = ROOT / "paper/results/pending.json"
    text = json.dumps(pending(), indent=1) + "\n"
    if args.check:
        if path.read_text() != text:
            raise SystemExit(f"{path} is out of date: python scripts/pending_rows.py")
        print(f"{path} is up to date")
        return
    path.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
