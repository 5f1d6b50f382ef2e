"""experiments/run.py end to end (through Hydra's compose API) and the table renderer."""
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from tests.conftest import skip_outside_ci

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("config", overrides=["model=stories260k", f"results_dir={tmp_path}", "experiment_name=t",
                                            "eval.max_windows=2", "eval.seq_len=128", "data.calib_samples=4",
                                            "wandb.mode=disabled", "progress=false", *overrides])


def test_sweep_row_has_every_table_field_and_reruns_are_skipped(tmp_path):
    from spinquant import cli as run_mod
    from spinquant.report import tables as make_tables

    fp = run_mod.run_hydra(_cfg(tmp_path, "quant=w16a16"))
    q = run_mod.run_hydra(_cfg(tmp_path, "quant=w4a4kv4_gptq"))
    for row in (fp, q):
        for k in ("experiment", "run_id", "model", "scheme", "method", "spec", "metrics", "seed", "git_rev", "config"):
            assert k in row
        assert row["threads"] == torch.get_num_threads() and row["config"]["threads"] is None  # the count used
        assert set(row["metrics"]["ppl"]) == {"wikitext2", "wikitext2-tok", "python-docs"}
        for k in ("size_bytes", "size_on_disk_bytes", "peak_mem_bytes", "wall_s"):
            assert row["metrics"][k] > 0
        assert set(row["spec"]) >= {"w_bits", "w_group", "a_bits", "kv_bits"}
    assert q["scheme"] == "W4A4KV4" and q["method"] == {"rotation": "none", "weights": "gptq", "qat": "none"}
    assert fp["scheme"] == "W16A16" and fp["method"]["weights"] == "none"
    assert q["metrics"]["ppl"]["wikitext2"] > fp["metrics"]["ppl"]["wikitext2"]
    assert q["metrics"]["size_bytes"] < 0.45 * fp["metrics"]["size_bytes"]  # stories260k: 0.36
    files = sorted((tmp_path / "t").glob("*.json"))
    assert len(files) == 2
    mtime = files[0].stat().st_mtime_ns
    again = run_mod.run_hydra(_cfg(tmp_path, "quant=w16a16"))
    assert again["run_id"] == fp["run_id"] and files[0].stat().st_mtime_ns == mtime

    table = make_tables.render(make_tables.read_rows([tmp_path / "t"]))
    lines = [ln for ln in table.splitlines() if ln.startswith("| W")]
    assert lines[0].startswith("| W16A16 | FP") and lines[1].startswith("| W4A4KV4 | gptq")
    assert f"{q['metrics']['ppl']['wikitext2']:.2f}" in lines[1]


def test_malformed_row_is_a_clear_error(tmp_path):
    from spinquant.results import MalformedRowError, read_rows
    (tmp_path / "bad.json").write_text(json.dumps({"experiment": "x", "metrics": {}}))
    with pytest.raises(MalformedRowError, match="bad.json.*lacks required keys"):
        read_rows([tmp_path])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(MalformedRowError, match="not valid JSON"):
        read_rows([tmp_path])


def test_unknown_rotation_and_scheme_are_clear_errors(tmp_path):
    from omegaconf import open_dict

    from spinquant import cli as run_mod
    cfg = _cfg(tmp_path)
    with open_dict(cfg):
        cfg.rotation.name = "flatquant"
    with pytest.raises(ValueError, match="unknown rotation 'flatquant'"):
        run_mod.run_hydra(cfg)
    cfg = _cfg(tmp_path)
    with open_dict(cfg):
        cfg.quant.scheme = "W3A3"
    with pytest.raises(KeyError, match="unknown quantization scheme"):
        run_mod.run_hydra(cfg)


def test_run_id_ignores_display_and_path_keys_at_any_depth():
    from spinquant.results import run_id
    a = {"seed": 0, "progress": True, "results_dir": "x", "rotation": {"name": "spinquant", "progress": True}}
    b = {"seed": 0, "progress": False, "results_dir": "y", "rotation": {"name": "spinquant", "progress": False}}
    assert run_id(a) == run_id(b)
    assert run_id(a) != run_id({**a, "seed": 1})


@pytest.mark.parametrize("option", sorted(p.stem for p in (ROOT / "configs" / "quant").glob("*.yaml")))
def test_every_quant_config_composes_into_its_preset(tmp_path, option):
    from omegaconf import OmegaConf

    from spinquant.quant import QuantConfig
    cfg = _cfg(tmp_path, f"quant={option}")
    q = QuantConfig.from_dict(OmegaConf.to_container(cfg.quant, resolve=True))
    head, _, suffix = option.rpartition("_")
    base, method = (head, suffix) if suffix in ("gptq", "hqq") else (option, "rtn")  # <scheme>[_<method>].yaml
    assert q.method == method
    assert (q.scheme + ("-mixed" if q.overrides else "")).lower().replace("-", "_") == base  # w4a8_mixed: overrides
    assert q.label().startswith(f"W{q.weight.bits}A{q.act.bits}")


def test_committed_table_and_readme_are_rendered_from_the_committed_rows():
    from spinquant.report import tables as make_tables
    rows = make_tables.read_rows([ROOT / "paper" / "results" / "foundation"])
    pending = json.loads((ROOT / "paper" / "results" / "pending.json").read_text())["tables"].get("foundation", {})
    models = {r["model"] for r in rows} | set(pending)
    assert {"ref-llama", "stories260k"} <= models
    assert len(rows) == 10 * len(models) - sum(map(len, pending.values()))  # 8 + 2 W4A8-mixed per model
    text = make_tables.render_layout(rows, "schemes")
    revs = sorted({r["git_rev"][:12] for r in rows})
    last = text.strip().splitlines()[-1]  # a table names the commits its rows come from
    assert last.startswith("Rows (per model: commit, rows) from ") and all(f"`{v}`" in last for v in revs)
    assert (ROOT / "paper" / "foundation_table.md").read_text() == text
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- BEGIN foundation_table -->\n", 1)[1].split("<!-- END foundation_table -->", 1)[0]
    assert block == text
    fp = next(r for r in rows if r["model"] == "ref-llama" and r["scheme"] == "W16A16")
    assert f"{fp['metrics']['ppl']['wikitext2']:.2f}" in readme.split("## Results")[0]  # reported FP ppl


def test_spinquant_recipe_on_a_local_checkpoint_saves_and_reuses_its_rotations(tmp_path):
    """The README's one command, on a local folder (stories260K stands in for the user's checkpoint)."""
    from spinquant import cli as run_mod
    from spinquant.models.load import models_root
    path = models_root() / "stories260K"
    if not path.is_dir():
        skip_outside_ci("stories260K checkpoint not present")
    rot = tmp_path / "rot.pt"
    common = ["model=local", f"model.path={path}", "model.name=my-llama", "model.seq_len=128", "eval.datasets=[wikitext2]",
              "rotation=spinquant", "quant=w4a4kv4_gptq", "rotation.steps=3", "rotation.samples=8"]
    row = run_mod.run_hydra(_cfg(tmp_path, *common, f"rotation.save={rot}"))
    st = row["metrics"]["rotation_train"]
    assert row["model"] == "my-llama" and row["method"] == {"rotation": "spinquant", "weights": "gptq", "qat": "none"}
    assert len(st["losses"]) == 3 and st["orthogonality_error"] < 1e-4 and st["samples"] == 8
    assert st["train_quant"]["weight"]["bits"] == 16 and st["train_quant"]["act"]["bits"] == 4  # W16A4KV4
    assert rot.is_file()
    again = run_mod.run_hydra(_cfg(tmp_path, *common, f"rotation.load={rot}", "experiment_name=t2"))
    assert again["metrics"]["rotation_train"] == {"loaded_from": str(rot), "train_quant": st["train_quant"]}
    # the reloaded rotations are fused in the training run's order: the same weights bit for bit, the same number
    assert again["metrics"]["ppl"]["wikitext2"] == row["metrics"]["ppl"]["wikitext2"]
    with pytest.raises(Exception, match="model.path"):
        run_mod.run_hydra(_cfg(tmp_path, "model=local"))


def _fake_row(rot, weights, w, a, kv, ppl, rid):
    return {"model": "m", "run_id": rid, "method": {"rotation": rot, "weights": weights, "qat": "none"},
            "spec": {"w_bits": w, "a_bits": a, "kv_bits": kv}, "metrics": {"ppl": {"wikitext2": ppl}, "rotation_s": 7.0}}


def test_rotation_layout_pivots_methods_against_schemes_and_refuses_duplicates():
    from spinquant.report import tables as make_tables
    rows = [_fake_row("none", "none", 16, 16, 16, 10.0, "a"), _fake_row("none", "rtn", 4, 4, 4, 30.0, "b"),
            _fake_row("spinquant", "gptq", 4, 4, 4, 12.5, "c"), _fake_row("quarot", "rtn", 4, 16, 16, 11.0, "d")]
    lines = make_tables.render_rotation(rows).splitlines()
    assert lines[2] == "| Method | W4A16KV16 | W4A4KV4 | Rotation s (per column) |"
    assert lines[4] == "| FP | 10.00 | 10.00 | – |"
    assert lines[5:] == ["| RTN | – | 30.00 | – |", "| QuaRot-RTN | 11.00 | – | 7 |", "| SpinQuant-GPTQ | – | 12.50 | 7 |"]
    with pytest.raises(SystemExit, match="two rows for m"):
        make_tables.render_rotation(rows + [_fake_row("none", "rtn", 4, 4, 4, 31.0, "e")])


def test_study_layout_shows_the_seed_and_the_spread_of_repeated_settings():
    from spinquant.report import tables as make_tables

    def row(lr, seed, ppl):
        t = {"lr": lr, "steps": 100, "batch_size": 8, "heldout_loss_before": 5.0, "heldout_loss_after": 4.5,
             "train_s": 3.0}
        return {"model": "m", "scheme": "W4A4KV4", "method": {"weights": "rtn"}, "config": {"rotation": {"seed": seed}},
                "metrics": {"ppl": {"wikitext2": ppl}, "rotation_train": t}}
    text = make_tables.render_study([row(1.5, 2, 30.0), row(0.5, 0, 25.0), row(1.5, 0, 20.0), row(1.5, 1, 40.0)])
    lines = [ln for ln in text.splitlines() if ln.startswith("| RTN")]
    assert [ln.split(" | ")[1:5] for ln in lines] == [["0.5", "100", "8", "0"], ["1.5", "100", "8", "0"],
                                                       ["1.5", "100", "8", "1"], ["1.5", "100", "8", "2"]]
    assert "**20.00**" in lines[1] and "| -0.5000 |" in lines[0]
    assert "- RTN lr 1.5, 100 steps, batch 8 over 3 seeds: mean 30.00, min 20.00, max 40.00" in text
    assert "lr 0.5, 100 steps" not in text  # one seed: no spread line


def test_qat_lora_run_writes_its_training_stats_and_beats_nothing_silently(tmp_path):
    from spinquant import cli as run_mod
    common = ["quant=w4a8", "quant.group_fallback=channel", "eval.datasets=[wikitext2]", f"checkpoint_dir={tmp_path}/ck",
              "qat.train.steps=3", "qat.train.batch_size=2", "qat.train.micro_batch_size=1", "qat.train.seq_len=64",
              "qat.train.wandb_mode=disabled"]
    row = run_mod.run_hydra(_cfg(tmp_path, *common, "qat=lora", "qat.lora.rank=4"))
    st = row["metrics"]["qat_train"]
    assert row["method"]["qat"] == "lora" and len(st["losses"]) == 3 and st["train_tokens"] == 3 * 2 * 64
    assert 0 < st["trainable_params"] < 30_000  # adapters only (stories260K has 260K parameters)
    assert (tmp_path / "ck" / "t" / row["run_id"] / "checkpoint" / "trainer.json").is_file()
    full = run_mod.run_hydra(_cfg(tmp_path, *common, "qat=full"))
    assert full["metrics"]["qat_train"]["trainable_params"] > 100_000
    with pytest.raises(ValueError, match="unknown qat method"):
        from spinquant import qat
        qat.run(None, {"name": "qlora"}, None, None)


def test_committed_rotation_table_is_rendered_from_the_committed_rows():
    from spinquant.report import tables as make_tables
    rows = make_tables.read_rows([ROOT / "paper" / "results" / "rotation"])
    pending = json.loads((ROOT / "paper" / "results" / "pending.json").read_text())["tables"].get("rotation", {})
    models = {r["model"] for r in rows} | set(pending)
    assert {"ref-llama", "stories260k"} <= models
    assert len(rows) == 25 * len(models) - sum(map(len, pending.values()))  # FP + 4 x 6 per model, less those pending
    text = make_tables.render_layout(rows, "rotation")
    assert (ROOT / "paper" / "rotation_table.md").read_text() == text
    readme = (ROOT / "README.md").read_text()
    assert readme.split("<!-- BEGIN rotation_table -->\n", 1)[1].split("<!-- END rotation_table -->", 1)[0] == text
    for model in ("ref-llama", "stories260k"):  # the acceptance order at W4A4KV4, per weight quantizer
        ppl = {(r["method"]["rotation"], r["method"]["weights"]): r["metrics"]["ppl"]["wikitext2"]
               for r in rows if r["model"] == model and r["scheme"] == "W4A4KV4"}
        for w in ("rtn", "gptq"):
            assert ppl[("quarot", w)] <= ppl[("none", w)], (model, w)
    learned = [r for r in rows if r["method"]["rotation"] == "spinquant"]
    n_pending = sum(any(t.startswith("rotation=spinquant") for t in job.split()) for v in pending.values()
                    for job in v.values())
    assert len(learned) == 6 * len(models) - n_pending
    from spinquant import cli
    reduced = cli.compose("rotation=spinquant_reduced").rotation
    for r in learned:  # trained by the official optimizer at the official or the stated reduced recipe, and the
        st = r["metrics"]["rotation_train"]  # training lowered its own held-back objective (or moved it by noise)
        assert st["schedule"] == "cosine" and st["max_grad_norm"] == 1.0, r["_file"]
        assert (st["steps"], st["batch_size"]) in {(100, 8), (reduced.steps, reduced.batch_size)}, r["_file"]
        rise = st["heldout_loss_after"] - st["heldout_loss_before"]
        assert rise < 0 or (st.get("heldout_delta_se") is not None and rise < 2 * st["heldout_delta_se"]), \
            (r["_file"], st["heldout_loss_before"], st["heldout_loss_after"])


def test_qat_rows_get_training_cost_columns():
    from spinquant.report import tables as make_tables
    fp = _fake_row("none", "none", 16, 16, 16, 10.0, "a")
    q = {**_fake_row("none", "rtn", 4, 8, 16, 11.0, "b"), "scheme": "W4A8"}
    q["method"]["qat"] = "lora"
    q["metrics"] |= {"qat_train": {"train_tokens": 819200, "trainable_params": 651264}, "wall_s": 600.4}
    fp["scheme"] = "W16A16"
    lines = make_tables.render([fp, q]).splitlines()
    assert lines[2].endswith("| Train tokens | Trainable params | Wall s |")
    assert lines[5].startswith("| W4A8 | rtn+lora |") and lines[5].endswith("| 0.82M | 0.65M | 600 |")
    assert lines[4].endswith("| – | – | – |")  # the FP row records no wall time


@pytest.mark.parametrize("model", ["stories260k", "ref-llama"])
def test_packed_evaluation_and_saved_round_trip(tmp_path, model):
    """kernels=cpu: the packed model's perplexity sits beside the fake-quant one (bf16 kernels: within 1 %), and
    the model saved and loaded back gives exactly the perplexity of the in-memory packed model."""
    from spinquant import cli as run_mod
    from spinquant import export
    common = [f"model={model}", "quant=w4a8", "quant.group_fallback=channel", "kernels=cpu", "eval.datasets=[wikitext2]",
              "++quant.embed.bits=8", "++quant.lm_head.bits=8"]
    saved = run_mod.run_hydra(_cfg(tmp_path, *common, f"kernels.save={tmp_path / 'ckpt'}"))
    mem = run_mod.run_hydra(_cfg(tmp_path / "b", *common))
    fq, pk = saved["metrics"]["ppl"]["wikitext2"], saved["metrics"]["packed"]["ppl"]["wikitext2"]
    assert abs(pk - fq) / fq < 0.01
    assert mem["metrics"]["packed"]["ppl"]["wikitext2"] == pk  # in memory == saved, then loaded
    assert saved["metrics"]["packed"]["reloaded_from"] == str(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / export.WEIGHTS).is_file() and (tmp_path / "ckpt" / "tokenizer.json").is_file()
    assert saved["metrics"]["packed"]["size_on_disk_bytes"] < saved["metrics"]["fp16_size_bytes"] * 0.6


def test_kernels_none_keeps_old_run_ids():
    from spinquant.results import run_id
    base = {"model": {"name": "m"}, "quant": {"scheme": "W4A8"}}
    assert run_id(base) == run_id({**base, "kernels": {"name": "none"}}) != run_id({**base, "kernels": {"name": "cpu"}})


def test_qat_table_pivots_methods_and_reports_recovered_gap():
    from spinquant.report import tables as make_tables

    def row(scheme, w, a, rot, weights, qat_name, ppl, trained=False):
        r = {"model": "m", "scheme": scheme, "run_id": f"{scheme}{rot}{weights}{qat_name}",
             "method": {"rotation": rot, "weights": weights, "qat": qat_name},
             "spec": {"w_bits": w, "w_group": 64 if a == 16 and w < 16 else None, "a_bits": a, "kv_bits": 16},
             "metrics": {"ppl": {"wikitext2": ppl}, "wall_s": 10.0}}
        if trained:
            r["metrics"]["qat_train"] = {"train_tokens": 409600, "trainable_params": 650000, "train_s": 9.0,
                                         "tokens_per_s": 45511.1}
        return r
    rows = [row("W16A16", 16, 16, "none", "none", "none", 100.0), row("W4A8", 4, 8, "none", "rtn", "none", 110.0),
            row("W4A8", 4, 8, "none", "rtn", "lora", 103.0, True), row("W2A16", 2, 16, "none", "rtn", "none", 150.0),
            row("W2A16", 2, 16, "spinquant", "rtn", "lora", 120.0, True),
            row("W16A16", 16, 16, "none", "none", "lora", 99.0, True)]
    text = make_tables.render_qat(rows)
    assert "| FP + LoRA (control) | 99.00‡ | 99.00‡ |" in text and "| FP + LoRA fine-tune (control) | 0.41M |" in text
    assert "| Method | W4A8 | W2A16-g64 |" in text
    # recovered share against the FP+LoRA control first ((110-103)/(110-99) = 64%), against FP beside it (70%)
    assert "| QAT+LoRA | 103.00 (64% / 70% FP) | – |" in text
    assert "| SpinQuant+QAT+LoRA | – | 120.00 (59% / 60% FP) |" in text
    assert "share of the gap from RTN to the FP + LoRA control" in text
    no_control = make_tables.render_qat(rows[:-1])
    assert "| QAT+LoRA | 103.00 (70%) | – |" in no_control and "gap from RTN to the FP that" in no_control
    assert "| W4A8 | QAT+LoRA | 0.41M | 0.65M | 9 | 45511 | 10 | 103.00 |" in text
    # a run resumed from a checkpoint that did not record the earlier time: no partial seconds as the run's time
    rows[2]["metrics"]["qat_train"] |= {"resumed_from": 50, "train_s": 4.0}
    text = make_tables.render_qat(rows)
    assert "| W4A8 | QAT+LoRA | 0.41M | 0.65M | – | – | – | 103.00 |" in text and "1 run(s) resumed" in text
    rows[2]["metrics"]["qat_train"] |= {"prior_train_s": 5.0, "train_s": 9.0}  # recorded: the total is known
    assert "| W4A8 | QAT+LoRA | 0.41M | 0.65M | 9 | 45511 | – | 103.00 |" in make_tables.render_qat(rows)


def test_committed_bench_table_is_rendered_from_the_committed_json():
    from spinquant.report import bench as bench_table
    res = ROOT / "paper" / "results"
    e2e, kern, avx2, prof = (json.loads((res / f"{n}.json").read_text())
                             for n in ("bench_e2e", "bench_kernels", "bench_e2e_avx2", "decode_profile"))
    text = bench_table.render(e2e, kern, avx2, prof)
    assert (ROOT / "paper" / "bench_table.md").read_text() == text
    readme = (ROOT / "README.md").read_text()
    assert readme.split("<!-- BEGIN bench_table -->\n", 1)[1].split("<!-- END bench_table -->", 1)[0] == text
    rows = {(r["model"], r["scheme"]): r for r in e2e}
    w4a8 = rows[("llama-3.2-1b-shape", "W4A8")]  # the numbers the README states
    r, q = w4a8["vs_bf16"], w4a8["vs_llama_cpp_q4_0"]
    assert f"W4A8 is 0.{round(100 * r['size_bytes'])}× the size, 0.{round(100 * r['peak_rss_bytes'])}× the peak RSS" in readme
    assert f"decodes **{q['decode_tok_s']:.2f}× faster**" in readme and f"prefills **{q['prefill_tok_s']:.2f}×**" in readme
    assert f"**{q['peak_rss_bytes']:.2f}× the peak RSS**" in readme
    # issue 5's acceptance on the committed benchmark: size <= 0.40x, peak memory <= 0.55x, decode >= 2.5x BF16
    assert r["size_bytes"] <= 0.40 and r["peak_rss_bytes"] <= 0.55 and r["decode_tok_s"] >= 2.5
    # issue 16's, against llama.cpp Q4_0 in the same run: decode >= 1.0x, peak RSS <= 1.2x (prefill >= 1.5x is missed)
    assert q["decode_tok_s"] >= 1.0 and q["peak_rss_bytes"] <= 1.2
    assert all(x["engine"] == "llama.cpp" or x.get("decode_path") == "lean" for x in e2e)
    assert w4a8["kernels"] == {"cpu_w4a8": 112, "cpu_w8a8": 1}  # measured on the native kernels


def test_committed_qat_table_is_rendered_from_the_committed_rows():
    from spinquant.report import tables as make_tables
    rows = make_tables.read_rows([ROOT / "paper" / "results" / "qat"])
    text = make_tables.render_layout(rows, "qat")
    assert (ROOT / "paper" / "qat_table.md").read_text() == text
    readme = (ROOT / "README.md").read_text()
    assert readme.split("<!-- BEGIN qat_table -->\n", 1)[1].split("<!-- END qat_table -->", 1)[0] == text
    ppl = {(r["scheme"], r["method"]["rotation"], r["method"]["qat"], r["method"]["weights"]): r["metrics"]["ppl"]["wikitext2"]
           for r in rows if r["model"] == "ref-llama"}  # the acceptance was set on the reference model's 100-step recipe
    fp, rtn, lora = ppl[("W16A16", "none", "none", "none")], ppl[("W4A4KV4", "none", "none", "rtn")], \
        ppl[("W4A4KV4", "none", "lora", "rtn")]
    assert (rtn - lora) / (rtn - fp) >= 0.70  # the acceptance: QAT+LoRA recovers >= 70 % of the RTN gap
