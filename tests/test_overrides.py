"""Per-module control: `quantize_(..., filter_fn=)` and `QuantConfig.overrides`, through size, packing and saving."""
import pytest
import torch

from spinquant import export
from spinquant.eval import size_bits
from spinquant.kernels import kernel_summary, pack
from spinquant.kernels.linear import PackedLinear
from spinquant.quant import QuantConfig, QuantLinear, quantize_
from tests.conftest import make_tiny

DOWN8 = {"modules": "*.down_proj", "weight": {"bits": 8, "granularity": "channel", "group_size": None}}
SKIP0 = {"modules": "model.layers.0.*", "skip": True}


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear) and "layers" in n}


def test_overrides_change_exactly_the_named_modules():
    uniform, mixed = make_tiny(layers=3), make_tiny(layers=3)
    quantize_(uniform, QuantConfig(scheme="W4A8"), progress=False)
    quantize_(mixed, QuantConfig.from_dict({"scheme": "W4A8", "overrides": [DOWN8, SKIP0]}), progress=False)
    u, m = _linears(uniform), _linears(mixed)
    assert set(u) == set(m) and len(u) == 21
    for name in u:
        if name.startswith("model.layers.0."):  # skipped: full precision, no activation quantizer
            assert m[name].qweight is None and m[name].act_spec is None
        elif name.endswith("down_proj"):
            assert m[name].qweight.spec.bits == 8 and m[name].qweight.spec.granularity == "channel"
            assert m[name].act_spec == u[name].act_spec
        else:  # untouched: the same codes and specs as the uniform model
            assert m[name].qweight.spec == u[name].qweight.spec and m[name].act_spec == u[name].act_spec
            assert torch.equal(m[name].qweight.codes, u[name].qweight.codes)
    assert mixed.spinquant.quant.label() == "W4A8-mixed"

    # size accounting follows the modules: recompute the difference by hand from the layer shapes
    def qbits(lin, bits, group):
        n_groups = lin.out_features * (lin.in_features // group if group else 1)
        return lin.out_features * lin.in_features * bits + 16 * n_groups
    diff = 0
    for name, lin in u.items():
        if name.startswith("model.layers.0."):
            diff += 16 * lin.in_features * lin.out_features - qbits(lin, 4, 32)
        elif name.endswith("down_proj"):
            diff += qbits(lin, 8, None) - qbits(lin, 4, 32)
    assert size_bits(mixed)["total_bits"] - size_bits(uniform)["total_bits"] == diff


def test_overridden_modules_pack_to_their_own_kernels_and_reload(tmp_path):
    model = make_tiny(layers=3, intermediate=192)
    quantize_(model, QuantConfig.from_dict({"scheme": "W4A8", "overrides": [DOWN8, SKIP0]}), progress=False)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        want = model(ids).logits
        pack(model, dtype=torch.float32)
        got = model(ids).logits
    kern = {n: m.kernel for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    assert not any(n.startswith("model.layers.0.") for n in kern)  # skipped layers are not packed
    w8 = {k for n, k in kern.items() if n.endswith("down_proj")}
    w4 = {k for n, k in kern.items() if not n.endswith("down_proj")}
    assert len(kern) == 14 and w8.isdisjoint(w4)  # 8-bit and 4-bit weights on different kernels
    assert (got - want).norm() / want.norm() < 2e-2
    export.save(model, tmp_path / "m")
    back, _ = export.load(tmp_path / "m")
    assert kernel_summary(back) == kernel_summary(model)
    assert back.spinquant.quant == model.spinquant.quant and back.spinquant.quant.overrides[1].skip
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, got, atol=1e-5)


def test_filter_fn_excludes_what_it_excludes():
    model = make_tiny(layers=2)
    seen = []

    def keep(module, name):
        seen.append(name)
        return "layers.1." not in name and name != "lm_head"
    cfg = QuantConfig.from_dict({"scheme": "W4A8", "lm_head": {"bits": 8}})
    quantize_(model, cfg, progress=False, filter_fn=keep)
    for name, lin in _linears(model).items():
        quantized = "layers.1." not in name
        assert (lin.qweight is not None) == quantized and (lin.act_spec is not None) == quantized, name
    assert not isinstance(model.lm_head, QuantLinear)  # filtered out: stays a plain FP linear
    assert "lm_head" in seen and len(seen) == 15


def test_gptq_honours_overrides():
    model = make_tiny(layers=2)
    calib = torch.randint(0, 128, (4, 32))
    cfg = QuantConfig.from_dict({"scheme": "W4A16", "method": "gptq", "overrides": [
        {"modules": "*.layers.1.mlp.*", "weight": {"bits": 3}}, {"modules": "*.q_proj", "skip": True}]})
    quantize_(model, cfg, calib, progress=False)
    for name, lin in _linears(model).items():
        if name.endswith("q_proj"):
            assert lin.qweight is None
        else:
            assert lin.qweight.spec.bits == (3 if ".layers.1.mlp." in name else 4), name


def test_qat_prepare_honours_overrides():
    from spinquant import qat
    model = make_tiny(layers=2)
    qat.prepare(model, QuantConfig.from_dict({"scheme": "W4A8", "overrides": [DOWN8, SKIP0]}))
    fq = {n: m for n, m in model.named_modules() if isinstance(m, qat.FakeQuantLinear)}
    assert fq["model.layers.0.self_attn.q_proj"].w_spec.bits == 16 and fq["model.layers.0.mlp.up_proj"].act_spec is None
    assert fq["model.layers.1.mlp.down_proj"].w_spec.bits == 8 and fq["model.layers.1.mlp.up_proj"].w_spec.bits == 4


@pytest.mark.parametrize("entry,match", [
    ({"modules": "*.dwon_proj", "weight": {"bits": 8}}, "matches no decoder linear"),
    ({"modules": "*.down_proj", "wieght": {"bits": 8}}, "unknown key"),
    ({"modules": "*.down_proj", "weight": {"bitz": 8}}, "unknown QuantSpec field"),
    ({"modules": "*.down_proj", "skip": True, "weight": {"bits": 8}}, "ambiguous"),
])
def test_bad_overrides_are_refused_before_anything_is_quantized(entry, match):
    model = make_tiny(layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        quantize_(model, QuantConfig.from_dict({"scheme": "W4A8", "overrides": [entry]}), progress=False)
    assert not _linears(model) and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_overrides_are_checked_from_the_model_config_alone():
    from spinquant.quant.apply import check_config_shapes
    config = make_tiny(layers=2).config
    check_config_shapes(config, QuantConfig.from_dict({"scheme": "W4A8", "overrides": [DOWN8, SKIP0]}))
    with pytest.raises(ValueError, match="matches no decoder linear"):
        check_config_shapes(config, QuantConfig.from_dict({"scheme": "W4A8", "overrides": [{"modules": "x.*", "skip": True}]}))
    with pytest.raises(ValueError, match="group"):  # group 48 does not divide down_proj's 128 inputs
        check_config_shapes(config, QuantConfig.from_dict({"scheme": "W4A8", "overrides": [
            {"modules": "*.down_proj", "weight": {"group_size": 48}}]}))
