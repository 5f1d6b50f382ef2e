"""Golden rows: a handful of cheap runs whose numbers the test suite recomputes (tests/test_golden_rows.py).

    python scripts/golden_rows.py --write     # from a clean checkout: recompute and write tests/golden/rows.json

Each case is a list of Hydra overrides of `spinquant run` on the shipped models, small enough for the default
test run (a few windows, a few training steps). The file records the commit the numbers came from.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "rows.json"
COMMON = ["eval.datasets=[wikitext2]", "eval.max_windows=6", "eval.seq_len=128", "eval.size=false", "eval.memory=false",
          "data.calib_samples=4", "wandb.mode=disabled", "progress=false", "threads=1"]
CASES = {
    "stories260k-fp": ["model=stories260k", "quant=w16a16"],
    "stories260k-w4a8-rtn": ["model=stories260k", "quant=w4a8", "quant.group_fallback=channel"],
    "stories260k-w4a4kv4-quarot-rtn": ["model=stories260k", "quant=w4a4kv4", "rotation=quarot"],
    "stories260k-w4a4kv4-spinquant-rtn": ["model=stories260k", "quant=w4a4kv4", "rotation=spinquant", "rotation.steps=2",
                                          "rotation.batch_size=2", "rotation.samples=8", "rotation.heldout=2",
                                          "rotation.seq_len=128"],
    "stories260k-w4a8-qat-lora": ["model=stories260k", "quant=w4a8", "quant.group_fallback=channel", "qat=lora",
                                  "qat.lora.rank=4", "qat.train.steps=4", "qat.train.batch_size=2",
                                  "qat.train.micro_batch_size=1", "qat.train.seq_len=64", "qat.train.wandb_mode=disabled",
                                  "qat.train.checkpoint_every=0", "qat.train.mixed_precision=no"],
    "ref-llama-w4a8-rtn": ["model=ref-llama", "quant=w4a8", "eval.max_windows=2", "eval.seq_len=512"],
    "smollm2-135m-w4a8-rtn": ["model=smollm2-135m", "quant=w4a8", "eval.max_windows=2", "eval.seq_len=512"],
}


def compute(name: str, workdir: Path) -> dict:
    """The golden numbers of one case: perplexity (+ SpinQuant's held-out objective, QAT's last loss)."""
    from hydra import compose, initialize_config_dir

    from spinquant.cli import CONFIG_DIR, run_hydra
    overrides = COMMON + CASES[name] + [f"results_dir={workdir}/results", f"checkpoint_dir={workdir}/ckpt",
                                        f"experiment_name={name}"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    row = run_hydra(cfg, choices={})
    out = {"ppl": row["metrics"]["ppl"]["wikitext2"]}
    kld = row["metrics"]["kld"]["wikitext2"]
    out |= {"kld_mean": kld["mean"], "kld_p99": kld["p99"], "top1": kld["top1"]}
    st = row["metrics"].get("rotation_train")
    if st:
        out |= {"heldout_loss_before": st["heldout_loss_before"], "heldout_loss_after": st["heldout_loss_after"]}
    if row["metrics"].get("qat_train"):
        out["qat_loss_last"] = row["metrics"]["qat_train"]["loss_last"]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help=f"write {GOLDEN.relative_to(ROOT)} (clean checkout only)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    from spinquant.results import git_rev, is_uncommitted
    rev = git_rev()
    if args.write and is_uncommitted(rev):
        raise SystemExit(f"refusing to write {GOLDEN}: the checkout is {rev}; commit first")
    with tempfile.TemporaryDirectory() as d:
        rows = {name: compute(name, Path(d)) for name in CASES}
    text = json.dumps({"git_rev": rev, "common": COMMON, "cases": {n: {"overrides": CASES[n], **rows[n]} for n in CASES}},
                      indent=1, sort_keys=True) + "\n"
    print(text)
    if args.write:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(text)


