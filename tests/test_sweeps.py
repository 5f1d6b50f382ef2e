"""Sweeps: skip rules, every table's sweep = its committed rows, kill-and-resume, the joblib and submitit
launchers, wandb mirroring of a run, and clear errors for unknown experiments."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from spinquant.results import run_id
from spinquant.sweeps import skip_rule, sweep_jobs

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=stories260k", "eval.datasets=[wikitext2]", "eval.max_windows=2", "eval.seq_len=128",
        "quant.group_fallback=channel", "progress=false", "wandb.mode=disabled"]


def _compose(overrides, hydra=False):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=hydra)


def test_skip_rules_match_group_choices_globs_lists_and_config_keys():
    cfg = OmegaConf.create({"model": {"name": "ref-llama"}, "qat": {"name": "lora"}})
    rules = [{"quant": "*_gptq", "qat": ["full", "lora"]}, {"model.name": "stories*"}]
    assert skip_rule(cfg, {"quant": "w4a8_gptq", "qat": "lora"}, rules) == rules[0]
    assert skip_rule(cfg, {"quant": "w4a8", "qat": "lora"}, rules) is None
    assert skip_rule(cfg, {"quant": "w4a8_gptq", "qat": "none"}, rules) is None
    assert skip_rule(OmegaConf.create({"model": {"name": "stories260k"}}), {}, rules[1:]) == rules[1]
    with pytest.raises(ValueError, match="neither a config group nor a config key"):
        skip_rule(cfg, {}, [{"quantt": "w4a8"}])
    with pytest.raises(ValueError, match="non-empty mappings"):
        skip_rule(cfg, {}, ["w4a8"])


def _sweep_jobs(experiment: str, *extra: str):
    """(choices, composed config) of every job `-m +experiment=<experiment> [extra]` runs, and of those it skips."""
    return sweep_jobs(ROOT / "configs", experiment, *extra)


PENDING = json.loads((ROOT / "paper/results/pending.json").read_text())["tables"]


def _committed(table: str, model: str) -> set[str]:
    return {p.stem for p in (ROOT / "paper/results" / table).glob("*.json")
            if json.loads(p.read_text())["model"] == model}


@pytest.mark.parametrize("model", ["ref-llama", "stories260k"])
def test_rotation_sweep_is_exactly_the_committed_rotation_table(model):
    rows, skipped = _sweep_jobs("rotation", f"model={model}")
    assert len(rows) == 4 * 6 + 1 and skipped == 3  # none, quarot, quarot_offline (R1/R2 only), spinquant
    committed = _committed("rotation", model)
    ids = {run_id(OmegaConf.to_container(c, resolve=True)) for _, c in rows}
    assert committed <= ids  # no committed row that today's code would not produce (e.g. an old optimizer's)
    # rerunning the sweep recomputes nothing (skip_existing) but the rows declared pending in paper/results/pending.json
    assert ids - committed == set(PENDING.get("rotation", {}).get(model, {}))


@pytest.mark.parametrize("model,extra", [("ref-llama", []), ("stories260k", ["quant.group_fallback=channel"])])
def test_foundation_sweep_is_the_committed_foundation_table_plus_declared_pending_rows(model, extra):
    rows, skipped = _sweep_jobs("foundation", f"model={model}", *extra)
    assert len(rows) == 10 and skipped == 0
    committed = _committed("foundation", model)
    ids = {run_id(OmegaConf.to_container(c, resolve=True)) for _, c in rows}
    assert committed <= ids
    assert ids - committed == set(PENDING.get("foundation", {}).get(model, {}))


def test_qat_sweep_has_the_tables_22_rows_and_reuses_the_committed_ones():
    rows, skipped = _sweep_jobs("qat")
    assert len(rows) == 22 and skipped == 9 * 3 * 2 - 22
    kinds = {(c["quant"].endswith("_gptq"), c["qat"], c["rotation"]) for c, _ in rows}
    assert kinds == {(False, "none", "none"), (True, "none", "none"), (False, "full", "none"),
                     (False, "lora", "none"), (False, "lora", "spinquant")}
    assert {c["quant"] for c, _ in rows if c["qat"] == "lora" and c["rotation"] == "none"} >= {"w16a16", "w4a8"}
    committed = _committed("qat", "ref-llama")
    ids = [run_id(OmegaConf.to_container(c, resolve=True)) for _, c in rows]
    assert len(set(ids)) == 22
    # every committed QAT row is a job of the sweep: the sweep reproduces the table, it does not fork it
    assert committed <= set(ids)
    assert set(ids) - committed == set(PENDING.get("qat", {}).get("ref-llama", {}))  # the missing rows: declared pending


def _launch(tmp_path, quants, *extra):
    cmd = [sys.executable, str(ROOT / "experiments/run.py"), "-m", f"quant={quants}", *TINY, f"results_dir={tmp_path}/res",
           "experiment_name=sw", f"checkpoint_dir={tmp_path}/ck", f"hydra.sweep.dir={tmp_path}/multirun", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return cmd, env


def test_killed_sweep_rerun_skips_written_rows_and_loses_nothing(tmp_path):
    cmd, env = _launch(tmp_path, "w16a16,w8a8,w4a16")
    res = tmp_path / "res" / "sw"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 300
    while not list(res.glob("*.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = sorted(res.glob("*.json"))
    assert 1 <= len(first) < 3, "the sweep should be killed after its first row"
    stamps = {p.name: p.stat().st_mtime_ns for p in first}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = sorted(res.glob("*.json"))
    assert len(rows) == 3 and not list(res.glob(".*"))
    assert {p.name: p.stat().st_mtime_ns for p in rows if p.name in stamps} == stamps  # not recomputed
    assert out.stdout.count("[skip]") == len(first)
    assert {json.loads(p.read_text())["scheme"] for p in rows} == {"W16A16", "W8A8", "W4A16"}


@pytest.mark.parametrize("launcher", ["parallel", "submitit_local"])
def test_sweep_runs_on_the_joblib_and_submitit_launchers(tmp_path, launcher):
    cmd, env = _launch(tmp_path, "w16a16,w4a8", f"hydra/launcher={launcher}", "threads=1")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    rows = [json.loads(p.read_text()) for p in (tmp_path / "res" / "sw").glob("*.json")]
    assert sorted(r["scheme"] for r in rows) == ["W16A16", "W4A8"]
    assert all(r["metrics"]["ppl"]["wikitext2"] > 1 for r in rows)


def test_slurm_launcher_config_composes_onto_submitit():
    cfg = _compose(["+experiment=qat", "hydra/launcher=slurm", "hydra.launcher.partition=gpu"], hydra=True)
    la = cfg.hydra.launcher
    assert la._target_.endswith("SlurmLauncher") and la.partition == "gpu" and la.gpus_per_node == 1
    assert la.timeout_min >= 60 and la.cpus_per_task >= 1
    assert OmegaConf.to_container(cfg.hydra.launcher, resolve=False)["name"] == "${experiment_name}"


def test_unknown_experiment_is_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "experiments/run.py"), "+experiment=no_such_table",
                          f"results_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    err = out.stderr + out.stdout
    assert "Could not find 'experiment/no_such_table'" in err and "qat" in err and "Traceback" not in err


def test_wandb_offline_run_holds_the_rows_config_and_metrics(tmp_path):
    from spinquant import cli as run_mod
    from spinquant.tracking import read_offline_run_full
    cfg = _compose(["quant=w4a8", *TINY, f"results_dir={tmp_path}", "experiment_name=wb",
                    f"checkpoint_dir={tmp_path}/ck", "wandb.mode=offline"])
    row = run_mod.run_hydra(cfg)
    history, summary, config = read_offline_run_full(tmp_path / "ck" / "wb" / row["run_id"])
    assert summary["ppl/wikitext2"] == pytest.approx(row["metrics"]["ppl"]["wikitext2"])
    assert summary["size_bytes"] == row["metrics"]["size_bytes"] and summary["scheme"] == "W4A8"
    assert summary["run_id"] == row["run_id"] and summary["method/weights"] == "rtn"
    assert history[-1]["ppl/wikitext2"] == pytest.approx(row["metrics"]["ppl"]["wikitext2"])
    assert config["quant"]["scheme"] == "W4A8" and config["seed"] == 0
    assert config["_group"] == "wb"  # a sweep (an experiment) is a wandb group
    # read while wandb's service is still writing: a file cut anywhere, or with a torn last record, parses to a
    # prefix of the records (never a protobuf error), and reports the run finished only once the exit record is in
    from spinquant.tracking import _parse_run
    data = next((tmp_path / "ck" / "wb" / row["run_id"]).glob("wandb/offline-run-*/*.wandb")).read_bytes()
    full = _parse_run(data)
    assert full[3] and full[0] == history
    cuts = sorted({*range(0, len(data), max(1, len(data) // 300)), len(data) - 1})
    seen = [_parse_run(data[:cut]) for cut in cuts]
    assert not any(s[3] for s in seen) and all(s[0] == history[:len(s[0])] for s in seen)
    assert len(seen[-1][0]) == len(history)  # only the exit record (last) is missing
    torn = bytearray(data)
    torn[-3] ^= 0xFF  # a byte of the last record's payload not yet flushed: its crc no longer matches
    assert not _parse_run(bytes(torn))[3]
    # disabled mode: no wandb folder at all
    cfg = _compose(["quant=w16a16", *TINY, f"results_dir={tmp_path}", "experiment_name=wb",
                    f"checkpoint_dir={tmp_path}/ck2", "wandb.mode=disabled"])
    assert run_mod.run_hydra(cfg)["scheme"] == "W16A16" and not (tmp_path / "ck2").exists()


def test_spinquant_study_sweep_is_exactly_the_committed_study():
    rows, skipped = _sweep_jobs("spinquant_study", "model=stories260k")
    # RTN: lr x steps x batch; GPTQ: lr 0.5 / 1.5 at 100 steps; both: seeds 1, 2 of lr 1.5 / 100 steps / batch 8
    assert len(rows) == 12 + 4 + 2 * 2 and skipped == 2 * 3 * 2 * 2 * 3 - 20
    ids = {run_id(OmegaConf.to_container(c, resolve=True)) for _, c in rows}
    assert ids == _committed("spinquant_study", "stories260k")


def test_command_line_overrides_replace_the_experiments_sweep_params_as_hydra_does():
    """`run.py -m +experiment=X key=v` fixes a swept key; `key=a,b` sweeps it instead of the experiment's list;
    a bracket list is a value, not a sweep."""
    from spinquant.sweeps import is_sweep
    fixed, _ = _sweep_jobs("spinquant_study", "model=stories260k", "rotation.lr=0.5", "rotation.steps=100",
                           "rotation.batch_size=8")
    assert sorted(ch["quant"] + "/" + ch["rotation.seed"] for ch, _ in fixed) == \
        ["w4a4kv4/0", "w4a4kv4_gptq/0"]  # seeds 1, 2 are skipped off lr 1.5
    assert {c.rotation.lr for _, c in fixed} == {0.5}
    swept, _ = _sweep_jobs("qat", "quant=w4a4kv4,w2a16_g64_gptq")
    assert {ch["quant"] for ch, _ in swept} == {"w4a4kv4", "w2a16_g64_gptq"}
    assert len(swept) == 4 + 1  # w4a4kv4: none, full, lora, SpinQuant+lora; GPTQ: PTQ only
    assert not is_sweep("[wikitext2,ptb]") and is_sweep("a,b") and not is_sweep("0.5")
    with pytest.raises(ValueError, match="sweep functions"):
        is_sweep("range(1,4)")


def test_the_reduced_spinquant_recipe_is_the_official_one_with_fewer_steps_and_both_skip_no_fp_row():
    """rotation=spinquant_reduced changes only steps, batch and samples (every sample seen once, as the official
    800 = 100 x 8), so its rows differ from the official recipe's in the cost alone; the rotation and QAT sweeps skip
    its FP / non-LoRA combinations as they skip SpinQuant's."""
    official = OmegaConf.to_container(_compose(["rotation=spinquant"]).rotation)
    reduced = OmegaConf.to_container(_compose(["rotation=spinquant_reduced"]).rotation)
    assert {k for k in official if official[k] != reduced[k]} == {"steps", "batch_size", "samples"}
    assert reduced["samples"] == reduced["steps"] * reduced["batch_size"] < official["samples"]
    assert official["samples"] == official["steps"] * official["batch_size"]
    for table, n_spin in (("rotation", 6), ("qat", 4)):
        jobs, _ = sweep_jobs(ROOT / "configs", table, "model=smollm2-135m", "rotation=none,spinquant_reduced")
        spin = [c for c, _ in jobs if c["rotation"] == "spinquant_reduced"]
        assert len(spin) == n_spin and all(c["quant"] != "w16a16" for c in spin)
        assert table != "qat" or all(c["qat"] == "lora" for c in spin)
