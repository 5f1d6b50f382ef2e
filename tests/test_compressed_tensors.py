"""compressed-tensors export: written from our codes, reloaded by transformers (+ the compressed-tensors package,
an independent implementation of the format) with our logits; refusals before anything is written."""
import pytest
import torch

from spinquant import rotation
from spinquant.quant import QuantConfig, quantize_
from tests.conftest import make_tiny, require

ct = require("compressed_tensors")
from compressed_tensors.compressors import pack_to_int32, unpack_from_int32  # noqa: E402

from spinquant.ct_export import CTExportError, export_compressed_tensors, pack_int32  # noqa: E402

W4G32 = {"scheme": "W4A16", "weight": {"granularity": "group", "group_size": 32}}


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_packing_is_compressed_tensors_layout(bits):
    codes = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (7, 96), dtype=torch.int8)
    assert torch.equal(pack_int32(codes, bits), pack_to_int32(codes, bits))
    assert torch.equal(unpack_from_int32(pack_int32(codes, bits), bits, codes.shape), codes)


def _reload(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


@pytest.mark.parametrize("cfg,tol", [(W4G32, 0.0), ({"scheme": "W4A16"}, 0.0), ({"scheme": "W8A8"}, 2e-3),
                                     ({**W4G32, "overrides": [{"modules": "*.down_proj", "weight": {"bits": 8}},
                                                              {"modules": "model.layers.0.*", "skip": True}]}, 0.0)])
def test_checkpoint_reloads_in_transformers_with_our_logits(tmp_path, cfg, tol):
    model = make_tiny(layers=3)
    quantize_(model, QuantConfig.from_dict(cfg), progress=False)
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        want = model(ids).logits
    back = _reload(export_compressed_tensors(model, tmp_path / "ckpt"))
    with torch.no_grad():
        got = back(ids).logits
    # weight-only: exactly our dequantized weights; W8A8: compressed-tensors' own per-token activation rounding
    assert ((got - want).norm() / want.norm()).item() <= tol + 1e-6
    if cfg.get("overrides"):
        import json
        groups = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]["config_groups"]
        assert len(groups) == 2 and sorted(g["weights"]["num_bits"] for g in groups.values()) == [4, 8]
        assert not any("layers.0." in t for g in groups.values() for t in g["targets"])


@pytest.mark.parametrize("setup,match", [
    (lambda m: quantize_(m, QuantConfig(scheme="W4A8"), progress=False), "no compressed-tensors layout"),
    (lambda m: quantize_(m, QuantConfig(scheme="W4A4KV4"), progress=False), "KV-cache"),
    (lambda m: quantize_(m, QuantConfig.from_dict({**W4G32, "weight": {**W4G32["weight"], "symmetric": False}}),
                         progress=False), "asymmetric"),
    (lambda m: quantize_(m, QuantConfig.from_dict({**W4G32, "lm_head": {"bits": 8}}), progress=False), "lm_head"),
    (lambda m: (rotation.apply(m, {"name": "quarot"}), quantize_(m, QuantConfig.from_dict(W4G32), progress=False)),
     "online Hadamard"),
    (lambda m: None, "nothing is quantized"),
])
def test_what_the_export_cannot_hold_is_refused_before_writing(tmp_path, setup, match):
    model = make_tiny(layers=2)
    setup(model)
    with pytest.raises(CTExportError, match=match):
        export_compressed_tensors(model, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_ref_llama_checkpoint_has_our_perplexity(tmp_path):
    from spinquant.data import tokenize_dataset
    from spinquant.eval.perplexity import perplexity_of_ids
    from spinquant.models import load
    model, tok = load("ref-llama")
    quantize_(model, QuantConfig(scheme="W4A16-g128"), progress=False)
    ids = tokenize_dataset(tok, "wikitext2", add_bos=True)
    ours = perplexity_of_ids(model, ids, 512, max_windows=2, progress=False).ppl
    back = _reload(export_compressed_tensors(model, tmp_path / "ckpt", tok))
    assert perplexity_of_ids(back, ids, 512, max_windows=2, progress=False).ppl == pytest.approx(ours, rel=1e-6)
    assert (tmp_path / "ckpt" / "tokenizer.json").is_file()


def test_cli_export_refuses_from_config_then_writes(tmp_path, monkeypatch):
    from spinquant import cli, pipeline
    real = pipeline.load

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the refusal")
    monkeypatch.setattr(pipeline, "load", no_load)
    for overrides, match in ((["quant=w4a8"], "no compressed-tensors layout"), (["quant=w4a4kv4"], "KV-cache"),
                             (["quant=w4a16", "rotation=quarot"], "rotation=quarot_offline")):
        with pytest.raises(CTExportError, match=match):
            cli.main(["export", str(tmp_path / "c"), "--format", "compressed-tensors", *overrides])
    monkeypatch.setattr(pipeline, "load", real)
    cli.main(["export", str(tmp_path / "c"), "--format", "compressed-tensors", "quant=w4a16_g128", "progress=false"])
    import json
    qc = json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]
    (group,) = qc["config_groups"].values()
    assert qc["format"] == "pack-quantized" and group["weights"]["num_bits"] == 4 and group["weights"]["group_size"] == 128
    assert len(group["targets"]) == 6 * 7 and isinstance(_reload(tmp_path / "c").model.layers[0].mlp.up_proj, torch.nn.Linear)


def test_deploy_row_of_a_checkpoint_reloaded_in_transformers(tmp_path):
    """The transformers deploy row measures the reloaded checkpoint (not our model): per text its perplexity and KLD
    to the FP model equal a direct evaluation of the reloaded model; the size is the whole checkpoint folder."""
    from spinquant.deploy import transformers_deploy_row
    from spinquant.eval.perplexity import perplexity_of_ids
    fp, model = make_tiny(layers=2, seed=5), make_tiny(layers=2, seed=5)
    quantize_(model, QuantConfig(scheme="W8A8"), progress=False)
    folder = export_compressed_tensors(model, tmp_path / "ckpt")
    texts = {"a": torch.randint(0, 128, (1, 260), generator=torch.Generator().manual_seed(0)),
             "b": torch.randint(0, 128, (1, 260), generator=torch.Generator().manual_seed(1))}
    row = transformers_deploy_row("tiny", "CT-W8A8", "rtn", folder, texts, 128, 128, 1, None, reference=fp)
    back = _reload(folder)
    for ds, ids in texts.items():
        want = perplexity_of_ids(back, ids, 128, batch_size=1, progress=False, reference=fp)
        got = row["per_dataset"][ds]
        assert got["ppl_runtime"] == pytest.approx(want.ppl, rel=1e-9) and got["windows"] == 2
        assert got["kld_runtime"]["window_kld"] == pytest.approx(want.kld.window_kld, rel=1e-9)
        assert got["kld_runtime"]["mean"] > 0 and got["ppl_framework"] is None
    assert row["per_dataset"]["a"]["ppl_runtime"] != row["per_dataset"]["b"]["ppl_runtime"]
    assert row["file_bytes"] == sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert row["runtime"] == "transformers" and row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0
