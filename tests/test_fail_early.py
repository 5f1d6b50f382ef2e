"""Bad input fails before expensive work, with a message naming the problem; nothing is silently wrong.

Each run below would load a model and run GPTQ / SpinQuant / evaluation; `spinquant.pipeline.load` is replaced by a function
that fails the test, so an error raised after the model load would show up as that failure instead."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from spinquant.quant import QuantConfig, quantize_
from spinquant.quant.schemes import SCHEMES
from tests.conftest import make_tiny

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("config", overrides=["model=stories260k", f"results_dir={tmp_path / 'results'}",
                                            "experiment_name=t", "eval.max_windows=2", "eval.seq_len=128",
                                            "data.calib_samples=4", "wandb.mode=disabled", "progress=false",
                                            *overrides])


@pytest.fixture
def run_mod(monkeypatch):
    from spinquant import cli, pipeline

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the bad input was reported")
    monkeypatch.setattr(pipeline, "load", no_load)
    return cli


def test_quant_config_with_a_scheme_name_is_that_preset_and_unknown_names_are_refused():
    for name, preset in SCHEMES.items():
        assert QuantConfig(scheme=name) == preset
        assert QuantConfig(scheme=name).label() == preset.label()
    assert QuantConfig(scheme="W4A8").weight.bits == 4 and QuantConfig(scheme="W4A8").act.bits == 8
    assert QuantConfig(scheme="W4A8", method="gptq").method == "gptq"  # explicit fields still win
    with pytest.raises(ValueError, match="unknown quantization scheme 'W5A5'.*W4A8"):
        QuantConfig(scheme="W5A5")


def test_quantizing_a_quantized_model_is_refused():
    model = make_tiny("llama")
    quantize_(model, QuantConfig(scheme="W4A8"), progress=False)
    with pytest.raises(ValueError, match=r"already quantized \(W4A8\)"):
        quantize_(model, QuantConfig(scheme="W8A8"), progress=False)
    model.spinquant.quant = None  # even without the recorded config, quantized modules are recognised
    with pytest.raises(ValueError, match="already quantized"):
        quantize_(model, QuantConfig(scheme="W8A8"), progress=False)


def test_missing_eval_file_is_reported_before_the_model_loads(tmp_path, run_mod):
    from spinquant.data import DataError
    with pytest.raises(DataError, match="missing data file.*nope.txt"):
        run_mod.run_hydra(_cfg(tmp_path, "quant=w4a16_gptq", f"eval.datasets=[{tmp_path / 'nope.txt'}]"))


def test_eval_file_shorter_than_one_window_is_reported_before_the_model_loads(tmp_path, run_mod):
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time there was a cat.\n")
    with pytest.raises(ValueError, match=r"eval dataset .*short.txt' has \d+ tokens, fewer than the 128"):
        run_mod.run_hydra(_cfg(tmp_path, "quant=w4a16_gptq", f"eval.datasets=[{short}]"))


def test_unwritable_results_dir_is_reported_before_the_model_loads(tmp_path, run_mod):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match="not writable.*set results_dir"):
        run_mod.run_hydra(_cfg(tmp_path, "quant=w4a8", f"results_dir={blocker / 'results'}"))


def test_group_size_that_does_not_divide_a_layer_is_reported_from_the_config(tmp_path, run_mod):
    # stories260K: hidden 64, MLP 172; group 32 does not divide down_proj's input (172)
    with pytest.raises(ValueError, match="group_size 32 does not divide the last dimension 172 of down_proj weight"):
        run_mod.run_hydra(_cfg(tmp_path, "quant=w4a8_gptq"))
    with pytest.raises(ValueError, match="group_size 48 does not divide the last dimension 64 of q_proj"):
        run_mod.run_hydra(_cfg(tmp_path, "quant=w4a8", "quant.group_fallback=channel", "++quant.act.group_size=48",
                         "++quant.act.granularity=group"))


def test_cuda_on_a_cpu_only_torch_is_a_clear_error(tmp_path, run_mod):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(ValueError, match="device='cuda' but this torch .* (CPU-only build|sees no GPU)"):
        run_mod.run_hydra(_cfg(tmp_path, "device=cuda"))


def _local_model(tmp_path, tokenizer=True, max_pos=None) -> Path:
    from spinquant.models.load import models_root
    src, dst = models_root() / "stories260K", tmp_path / "my-model"
    dst.mkdir()
    for f in src.iterdir():
        if tokenizer or not f.name.startswith("tokenizer"):
            shutil.copy(f, dst / f.name)
    if max_pos:
        c = json.loads((dst / "config.json").read_text())
        c["max_position_embeddings"] = max_pos
        (dst / "config.json").write_text(json.dumps(c))
    return dst


def test_model_folder_without_a_tokenizer_is_a_clear_error(tmp_path, run_mod):
    path = _local_model(tmp_path, tokenizer=False)
    with pytest.raises(FileNotFoundError, match="has no tokenizer.*tokenizer.json"):
        run_mod.run_hydra(_cfg(tmp_path, "model=local", f"model.path={path}", "eval.max_windows=2"))


def test_local_model_evaluates_within_its_context(tmp_path, run_mod, capsys):
    """model=local picks min(2048, max_position_embeddings) and says so; an eval length beyond it is refused."""
    path = _local_model(tmp_path, max_pos=256)
    cfg = _cfg(tmp_path, "model=local", f"model.path={path}", "eval.seq_len=${model.seq_len}",
               f"eval.datasets=[{tmp_path / 'nope.txt'}]")
    with pytest.raises(Exception, match="nope.txt"):  # stops at the (later) dataset check, after choosing the length
        run_mod.run_hydra(cfg)
    assert cfg.model.seq_len == 256 and "evaluating and calibrating at 256 tokens" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"eval.seq_len=512 exceeds the model's context \(max_position_embeddings=256"):
        run_mod.run_hydra(_cfg(tmp_path, "model=local", f"model.path={path}", "model.seq_len=512", "eval.seq_len=512"))


def test_committed_rows_are_refused_from_a_dirty_tree(tmp_path, run_mod, monkeypatch):
    from spinquant import results
    monkeypatch.setattr(results, "git_rev", lambda: "0123456789ab-dirty")
    with pytest.raises(results.DirtyTreeError, match="dirty"):
        run_mod.run_hydra(_cfg(tmp_path, f"results_dir={results.PAPER_RESULTS}", "experiment_name=should_not_exist"))
    assert not (results.PAPER_RESULTS / "should_not_exist").exists()
    row = {k: "x" for k in results.REQUIRED_KEYS} | {"git_rev": "0123456789ab-dirty"}
    with pytest.raises(results.DirtyTreeError, match="committed rows"):
        results.write_row(row, results.PAPER_RESULTS / "should_not_exist" / "r.json")
    assert results.revision_for(tmp_path / "elsewhere") == "0123456789ab-dirty"  # other folders: recorded as is


def test_bad_spinquant_settings_are_reported_before_the_model_loads(tmp_path, run_mod):
    with pytest.raises(ValueError, match="rotation.schedule must be 'cosine' or 'constant', got 'linear'"):
        run_mod.run_hydra(_cfg(tmp_path, "rotation=spinquant", "quant=w4a4kv4", "rotation.schedule=linear"))
    with pytest.raises(ValueError, match="rotation.lr must be > 0"):
        run_mod.run_hydra(_cfg(tmp_path, "rotation=spinquant", "quant=w4a4kv4", "rotation.batch_size=0"))


def test_spinquant_that_would_train_against_nothing_quantized_is_refused(tmp_path, run_mod):
    """At W16A16 (or an explicit 16-bit train_quant) the objective is rotation-invariant: training would learn
    nothing, so it is refused before the model loads; quantization from a per-module override alone counts."""
    from spinquant.rotation.spinquant import check_config, quantizes_nothing
    with pytest.raises(ValueError, match="would train against nothing quantized .*W16A16.*rotation=quarot"):
        run_mod.run_hydra(_cfg(tmp_path, "rotation=spinquant", "quant=w16a16"))
    with pytest.raises(ValueError, match="would train against nothing quantized"):
        run_mod.run_hydra(_cfg(tmp_path, "rotation=spinquant", "quant=w4a4kv4",
                               "rotation.train_quant={scheme: W16A16}"))
    fp = QuantConfig.from_dict({"scheme": "W16A16"})
    assert quantizes_nothing(fp)
    assert not quantizes_nothing(QuantConfig.from_dict({"scheme": "W16A16", "overrides": [
        {"modules": "*.down_proj", "weight": {"bits": 4}}]}))
    assert not quantizes_nothing(QuantConfig.from_dict({"scheme": "W16A16", "kv": {"bits": 4}}))
    for scheme, method in (("W4A16", "gptq"), ("W4A8", "gptq"), ("W4A4KV4", "rtn")):  # GPTQ at W4A16: trains RTN
        check_config({}, target=QuantConfig.from_dict({"scheme": scheme, "method": method}))
    with pytest.raises(ValueError, match="nothing quantized"):  # the library call checks too
        check_config({"train_quant": {"scheme": "W16A16"}})


# ---- the last silent and deep cases (issue: never compute on garbage) ---------------------------------------------

def test_rotating_twice_or_after_quantization_is_refused():
    from spinquant import rotation
    model = make_tiny("llama")
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        want = model(ids).logits
    rotation.apply(model, {"name": "quarot", "seed": 0})
    with pytest.raises(ValueError, match=r"already rotated \(quarot\)"):
        rotation.apply(model, {"name": "quarot", "seed": 1})
    assert model.spinquant.rotation.config["seed"] == 0  # the state still records the one rotation that happened
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, want, atol=1e-4)  # FP function intact
    rotation.apply(make_tiny("llama"), {"name": "none"})
    q = make_tiny("llama")
    quantize_(q, QuantConfig(scheme="W4A8"), progress=False)
    with pytest.raises(ValueError, match=r"already quantized \(W4A8\); rotate the FP model first"):
        rotation.apply(q, {"name": "quarot"})


def test_python_and_hydra_take_the_run_seed_for_the_rotation(tmp_path):
    import spinquant as sq
    from spinquant import rotation
    py = sq.RunConfig(seed=1, rotation=sq.QuaRotConfig(), qat={"name": "lora"})
    hy = sq.RunConfig.from_dict(_resolved(_cfg(tmp_path, "seed=1", "rotation=quarot")))
    assert py.rotation.seed == hy.rotation.seed == 1 and py.qat.train["seed"] == 1
    assert sq.RunConfig(seed=1, rotation=sq.QuaRotConfig(seed=0)).rotation.seed == 0  # an explicit seed stays
    weights = []
    for cfg in (py.rotation, hy.rotation, sq.QuaRotConfig(seed=0)):
        m = make_tiny("llama")
        rotation.apply(m, cfg)
        weights.append(m.model.layers[0].self_attn.q_proj.weight.clone())
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


def _resolved(cfg):
    from omegaconf import OmegaConf
    return OmegaConf.to_container(cfg, resolve=True)


def test_max_windows_below_one_is_refused_before_the_model_loads(tmp_path, run_mod):
    for n in (0, -1):
        with pytest.raises(ValueError, match=rf"eval.max_windows must be a positive integer or null, got {n}"):
            run_mod.run_hydra(_cfg(tmp_path, "quant=w4a8", f"eval.max_windows={n}"))


def test_evaluate_refuses_a_window_longer_than_the_models_context(stories):
    import spinquant as sq
    model, tok = stories
    with pytest.raises(ValueError, match=r"seq_len=1024 exceeds the model's context \(max_position_embeddings=512\)"):
        sq.evaluate(model, tok, sq.EvalConfig(datasets=["wikitext2"], max_windows=1), seq_len=1024, progress=False)


def test_run_config_takes_a_model_name_and_a_scheme_name():
    import spinquant as sq
    cfg = sq.RunConfig(model="ref-llama", quant="W4A8", rotation="quarot")
    assert (cfg.model.name, cfg.model.path) == ("ref-llama", "ref-llama") and cfg.quant == QuantConfig(scheme="W4A8")
    assert cfg.rotation.name == "quarot"


def test_quantize_with_a_scheme_string_says_how():
    with pytest.raises(TypeError, match=r"not the string 'W4A8': quantize_\(model, QuantConfig\(scheme='W4A8'\)\)"):
        quantize_(make_tiny("llama"), "W4A8")


def test_a_model_path_too_long_for_the_os_is_a_clear_error(tmp_path, run_mod):
    with pytest.raises(FileNotFoundError, match=r"\(5000 characters\) cannot be read: File name too long"):
        run_mod.run_hydra(_cfg(tmp_path, "model=local", f"model.path={'x' * 5000}", "model.name=x"))


def test_lean_decoder_checks_its_arguments_before_the_first_token():
    from spinquant.decode import LeanDecoder
    dec = LeanDecoder(make_tiny("llama"), max_len=16)
    prompt = torch.randint(0, 128, (1, 10))
    for bad, match in ((-3, "max_new_tokens must be a positive integer, got -3"), (0, "got 0"), (2.0, "got 2.0")):
        with pytest.raises(ValueError, match=match):
            dec.generate(prompt, bad)
    with pytest.raises(TypeError, match="integer token ids"):
        dec.generate(prompt.float(), 2)
    with pytest.raises(ValueError, match=r"token id 128 is outside the vocabulary \(0..127\)"):
        dec.generate(torch.tensor([[1, 128]]), 2)
    with pytest.raises(ValueError, match=r"token id -1 is outside"):
        dec.forward(torch.tensor([[-1]]))
    calls = []
    dec._forward = lambda *a, **k: calls.append(1)  # nothing may run when the request cannot fit
    with pytest.raises(ValueError, match=r"10 tokens \+ 8 new tokens needs 17 cache positions, more than max_len 16"):
        dec.generate(prompt, 8)
    assert not calls


def test_compressed_tensors_refuses_an_override_it_cannot_hold_before_loading(tmp_path, run_mod):
    from spinquant.ct_export import CTExportError
    for override, match in (("weight: {symmetric: false}", "asymmetric weights"),
                            ("act: {bits: 8, granularity: token, dynamic: true, symmetric: false}", "activations")):
        with pytest.raises(CTExportError, match=rf"quant.overrides\['\*.down_proj'\]: .*{match}"):
            run_mod.main(["export", str(tmp_path / "c"), "--format", "compressed-tensors", "quant=w4a16",
                          f"quant.overrides=[{{modules: '*.down_proj', {override}}}]"])
    assert not (tmp_path / "c").exists()


def test_the_readme_per_module_example_composes_and_skips_layer_0(tmp_path):
    import spinquant as sq
    cfg = sq.RunConfig.from_dict(_resolved(_cfg(tmp_path, "quant=w4a8",
                                                'quant.overrides=[{modules: "model.layers.0.*", skip: true}]')))
    assert cfg.quant.overrides[0].skip and cfg.quant.overrides[0].modules == "model.layers.0.*"


def test_a_qa_lora_rank_wider_than_the_pooled_inputs_is_refused_before_the_model_loads(tmp_path, run_mod):
    # stories260K: hidden 64 in groups of 32 -> 2 pooled inputs per q/k/v/gate/up adapter
    with pytest.raises(ValueError, match=r"qat.lora.rank=16 exceeds the 2 inputs of q_proj's adapter \(QA-LoRA pools "
                                         r"each group of 32 inputs\); set qat.lora.rank to at most 2"):
        run_mod.run_hydra(_cfg(tmp_path, "quant=w4a8", "qat=lora", "qat.lora.qa_lora=true", "qat.merge=true",
                               "quant.group_fallback=channel"))
