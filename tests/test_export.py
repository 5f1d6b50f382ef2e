"""spinquant.export: saved-then-loaded packed models compute exactly what they computed before saving."""
import copy
import json

import pytest
import torch

from spinquant import export, rotation
from spinquant.kernels import PackedEmbedding, PackedLinear, kernel_summary, pack
from spinquant.quant import QuantConfig, quantize_
from tests.conftest import make_tiny

LM8 = {"embed": {"bits": 8}, "lm_head": {"bits": 8},
       "lm_head_act": {"bits": 8, "symmetric": False, "granularity": "token", "dynamic": True}}


def _packed_tiny(scheme="W4A8", tied=False, rotate=False, extra=None):
    model = make_tiny("llama", tied=tied, hidden=64, intermediate=192, vocab=160)
    if rotate:
        rotation.apply(model, {"name": "quarot", "seed": 1})
    quantize_(model, QuantConfig.from_dict({"scheme": scheme, **(extra or {})}), progress=False)
    return pack(model)


@pytest.mark.parametrize("scheme,tied,rotate,extra", [
    ("W4A8", False, False, LM8),
    ("W4A8", True, False, LM8),           # one shared int8 table for embedding and lm_head
    ("W4A4KV4", False, True, None),       # online R3/R4 Hadamards and KV quantizers recorded
    ("W8A8", True, False, None),          # tied, unquantized embedding stored once
    ("W4A16", False, False, {"weight": {"symmetric": False}}),
    ("W4A8", False, True, {"overrides": [{"modules": "*.down_proj", "skip": True}]}),  # 16-bit down_proj keeps its R4
])
def test_save_load_gives_identical_logits(tmp_path, scheme, tied, rotate, extra):
    model = _packed_tiny(scheme, tied, rotate, extra)
    ids = torch.randint(0, 160, (2, 20))
    with torch.no_grad():
        want = model(ids).logits
    export.save(model, tmp_path / "m")
    loaded, tok = export.load(tmp_path / "m")
    assert tok is None
    assert kernel_summary(loaded) == kernel_summary(model)
    with torch.no_grad():
        got = loaded(ids).logits
    assert torch.equal(got, want)
    if rotate:
        assert loaded.model.layers[0].mlp.down_proj.input_transform is not None
        assert loaded.model.layers[0].self_attn.qk_transform is not None
        assert (getattr(loaded.model.layers[0].self_attn, "kv_quantizer", None) is not None) == ("KV" in scheme)
    if tied and extra:
        assert loaded.get_input_embeddings().codes.data_ptr() == loaded.get_output_embeddings().int8_table().data_ptr()


def test_what_spinquant_knows_about_a_model_is_one_typed_state_that_save_and_load_keep(tmp_path):
    """Rotation, quantization and packing record in `model.spinquant` (a ModelState) and nowhere else on the model;
    a packed checkpoint restores the same state; an unrelated `spinquant` attribute is refused, not overwritten."""
    from spinquant.models.state import ModelState, state_of
    plain = vars(make_tiny("llama", hidden=64, intermediate=192, vocab=160)).keys()
    model = _packed_tiny("W4A8", rotate=True)
    st = model.spinquant
    assert isinstance(st, ModelState) and st.rotation.name == "quarot" and st.quant.label() == "W4A8"
    assert st.packed_dtype == torch.bfloat16
    assert set(vars(model)) - set(plain) == {"spinquant"}  # no other attribute hung on the model
    export.save(model, tmp_path / "m")
    loaded = export.load(tmp_path / "m")[0].spinquant
    assert (loaded.rotation.to_dict(), loaded.quant, loaded.packed_dtype) == (st.rotation.to_dict(), st.quant,
                                                                              st.packed_dtype)
    other = make_tiny("llama", hidden=64, intermediate=192, vocab=160)
    other.spinquant = "someone else's"
    with pytest.raises(TypeError, match="not spinquant's ModelState"):
        state_of(other)


def test_saved_file_is_small_and_holds_4bit_codes(tmp_path):
    model = _packed_tiny("W4A8", extra=LM8)
    export.save(model, tmp_path / "m")
    from safetensors.torch import load_file
    t = load_file(str(tmp_path / "m" / export.WEIGHTS))
    q = t["model.layers.0.mlp.gate_proj.qweight"]
    assert q.dtype == torch.uint8 and tuple(q.shape) == (192, 32)  # 64 inputs, two codes a byte
    assert t["lm_head.qweight"].dtype == torch.int8


def test_lora_adapter_kept_beside_the_base_survives(tmp_path):
    from spinquant import qat
    model = make_tiny("llama", hidden=64, intermediate=128, vocab=128)
    q = QuantConfig.from_dict({"scheme": "W4A8"})
    qat.prepare(model, q, qat.QATConfig(mode="lora", lora_rank=4))
    for n, p in model.named_parameters():
        if n.endswith(".B"):
            torch.nn.init.normal_(p, std=0.05)
    qat.convert(model)
    pack(model)
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        want = model(ids).logits
    export.save(model, tmp_path / "m")
    loaded, _ = export.load(tmp_path / "m")
    assert loaded.model.layers[1].mlp.up_proj.adapter is not None
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)


def test_stories260k_saved_then_loaded_perplexity_and_generate(tmp_path, stories):
    from spinquant.eval import perplexity
    model, tok = stories
    model = copy.deepcopy(model)
    quantize_(model, QuantConfig.from_dict({"scheme": "W4A8", "group_fallback": "channel", **LM8}), progress=False)
    pack(model)
    before = perplexity(model, tok, "wikitext2", seq_len=256, max_windows=4, progress=False)
    export.save(model, tmp_path / "s", tokenizer=tok)
    loaded, tok2 = export.load(tmp_path / "s")
    after = perplexity(loaded, tok2, "wikitext2", seq_len=256, max_windows=4, progress=False)
    assert after.nll_sum == before.nll_sum and after.ppl == before.ppl
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    g1 = model.generate(ids, max_new_tokens=12, do_sample=False)
    g2 = loaded.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(g1, g2) and g2.shape[1] == ids.shape[1] + 12


# ---- bad files ----------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    export.save(_packed_tiny("W4A8", extra=LM8), tmp_path / "m")
    return tmp_path / "m"


def _rewrite_tensors(path, fn):
    from safetensors.torch import load_file, save_file
    t = load_file(str(path / export.WEIGHTS))
    fn(t)
    save_file(t, str(path / export.WEIGHTS))


def test_missing_tensor_is_named(saved):
    _rewrite_tensors(saved, lambda t: t.pop("model.layers.1.self_attn.o_proj.scale"))
    with pytest.raises(export.ExportFormatError, match="o_proj.scale.*missing"):
        export.load(saved)


def test_missing_norm_is_named(saved):
    _rewrite_tensors(saved, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(export.ExportFormatError, match="model.norm.weight"):
        export.load(saved)


def test_wrong_shape_is_named(saved):
    def cut(t):
        t["model.layers.0.mlp.down_proj.qweight"] = t["model.layers.0.mlp.down_proj.qweight"][:-1].clone()
    _rewrite_tensors(saved, cut)
    with pytest.raises(export.ExportFormatError, match="down_proj.qweight.*shape"):
        export.load(saved)


def test_unknown_format_version(saved):
    meta = json.loads((saved / export.META).read_text())
    meta["format_version"] = 99
    (saved / export.META).write_text(json.dumps(meta))
    with pytest.raises(export.ExportFormatError, match="format_version 99"):
        export.load(saved)


def test_corrupt_weights_file(saved):
    data = (saved / export.WEIGHTS).read_bytes()
    (saved / export.WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(export.ExportFormatError, match="corrupt"):
        export.load(saved)


def test_not_a_saved_model(tmp_path):
    with pytest.raises(export.ExportFormatError, match="not a saved spinquant model"):
        export.load(tmp_path)


def test_packed_types_after_load(saved):
    loaded, _ = export.load(saved)
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, PackedLinear)
    assert isinstance(loaded.get_input_embeddings(), PackedEmbedding)
    assert not any(p.is_meta for p in loaded.parameters()) and not any(b.is_meta for b in loaded.buffers())


# ---- integrity: a corrupted or edited file is refused with the reason ---------------------------------------------

def _meta(path):
    return json.loads((path / export.META).read_text())


def _edit_meta(path, fn):
    meta = _meta(path)
    fn(meta)
    (path / export.META).write_text(json.dumps(meta, indent=1))


def test_one_flipped_byte_in_the_weights_is_refused_naming_the_tensor(saved):
    data = bytearray((saved / export.WEIGHTS).read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    torch.manual_seed(0)
    pos = header + int(torch.randint(0, len(data) - header, ()).item())  # somewhere in the tensor bytes
    data[pos] ^= 0x10
    (saved / export.WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(export.ExportFormatError, match=r"tensor '.*' does not match the checksum"):
        export.load(saved)


@pytest.mark.parametrize("edit,match", [
    (lambda m: m["modules"]["model.layers.0.self_attn.q_proj"]["w_spec"].update(bits=8),
     "kernel 'int4' holds at most 4-bit"),
    (lambda m: m["modules"]["model.layers.0.self_attn.q_proj"]["w_spec"].update(bits=3),
     r"q_proj.qweight holds codes outside the range of its recorded w_spec int3"),
    (lambda m: m["modules"]["model.layers.0.self_attn.q_proj"].update(act_spec=None),
     "spinquant.json was changed after it was saved"),
    (lambda m: m["modules"]["model.layers.0.self_attn.q_proj"]["act_spec"].update(bits=4),
     "spinquant.json was changed after it was saved"),
    (lambda m: m["modules"]["model.layers.0.self_attn.q_proj"]["act_spec"].update(granularity="tensor"),
     "act_spec .* is not a per-token"),
    (lambda m: m.update(rotation={"name": "quarot", "config": {"seed": 0, "r3": True, "r4": True}, "stats": {}}),
     r"rotation 'quarot' \(r3=True, r4=True\) does not match the online transforms"),
    (lambda m: m.update(rotation={"name": "nope", "config": {}, "stats": {}}), "rotation 'nope' is not a known rotation"),
    (lambda m: m["model_config"].update(hidden_size=128),
     r"'model.embed_tokens' is recorded as 160 x 64, but model_config makes it 160 x 128"),
    (lambda m: m["model_config"].update(num_hidden_layers=1), "model.layers.1.* does not exist in the model"),
    (lambda m: m["attention"].update({"2": {"qk_transform": None, "kv": None}}),
     r"`attention` has entries for layers \['0', '1', '2'\], but model_config has 2 layers"),
    (lambda m: m["attention"]["0"].update(kv={"k": {"bits": 4}}), "attention 0: kv.v must be a quantized spec"),
    (lambda m: m.update(dtype="int3"), "dtype 'int3' is not one of"),
])
def test_an_edited_spec_is_refused_with_the_reason(saved, edit, match):
    _edit_meta(saved, edit)
    with pytest.raises(export.ExportFormatError, match=match):
        export.load(saved)


def test_a_rotated_models_rotation_record_is_checked(tmp_path):
    export.save(_packed_tiny("W4A4KV4", rotate=True), tmp_path / "m")
    assert _meta(tmp_path / "m")["rotation"]["name"] == "quarot"
    export.load(tmp_path / "m")
    _edit_meta(tmp_path / "m", lambda m: m["rotation"].update(name="none"))  # the R3/R4 would silently stay
    with pytest.raises(export.ExportFormatError, match=r"rotation 'none' \(r3=False, r4=False\) does not match"):
        export.load(tmp_path / "m")


def test_version_1_files_still_load_with_a_warning(saved):
    _edit_meta(saved, lambda m: (m.pop("checksums"), m.update(format_version=1)))
    with pytest.warns(UserWarning, match="format version 1, no checksums"):
        export.load(saved)
