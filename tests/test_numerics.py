"""Never compute on garbage: NaN / Inf weights are refused before rotation or quantization (naming the tensor), and a
non-finite activation during calibration, evaluation or decode is an error naming where it first appeared."""
import pytest
import torch

from spinquant import rotation
from spinquant.decode import LeanDecoder
from spinquant.eval.perplexity import perplexity_of_ids
from spinquant.numerics import NonFiniteError, first_nonfinite_module
from spinquant.quant import QuantConfig, quantize_
from tests.conftest import make_tiny


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_nan_weight_is_refused_before_quantization_naming_the_tensor(method):
    model = make_tiny("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight[3, 5] = float("nan")
    calib = torch.randint(0, 128, (4, 32))
    with pytest.raises(NonFiniteError, match=r"model.layers.1.self_attn.k_proj.weight; refusing quantization"):
        quantize_(model, QuantConfig(scheme="W4A8", method=method), calib, progress=False)
    assert getattr(model, "quant_config", None) is None  # nothing was quantized


def test_inf_weight_is_refused_before_rotation():
    model = make_tiny("llama")
    with torch.no_grad():
        model.model.norm.weight[0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"model.norm.weight; refusing rotation 'quarot'"):
        rotation.apply(model, {"name": "quarot", "seed": 0})


def _overflowing():
    """Finite weights whose layer-1 MLP overflows float32: gate·up exceeds 3.4e38."""
    model = make_tiny("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.mul_(1e30)
        model.model.layers[1].mlp.gate_proj.weight.mul_(1e30)
    return model


def test_inf_activation_in_evaluation_is_reported_with_the_module():
    model = _overflowing()
    ids = torch.randint(0, 128, (1, 130))
    assert first_nonfinite_module(model, lambda: model(ids[:, :64])).startswith("model.layers.1.mlp")
    with pytest.raises(NonFiniteError, match=r"during evaluation \(ppl\), first in the output of model.layers.1.mlp"):
        perplexity_of_ids(model, ids, 64, progress=False)
    fine = make_tiny("llama")
    assert first_nonfinite_module(fine, lambda: fine(ids[:, :64])) is None
    assert perplexity_of_ids(fine, ids, 64, progress=False).ppl > 1


def test_inf_activation_in_gptq_calibration_names_the_linear():
    model = _overflowing()
    with pytest.raises(NonFiniteError, match=r"entering model.layers.1.mlp.down_proj during GPTQ calibration"):
        quantize_(model, QuantConfig(scheme="W4A16", method="gptq"), torch.randint(0, 128, (4, 32)), progress=False)


def test_inf_activation_in_decode_names_the_layer_and_rewinds():
    dec = LeanDecoder(_overflowing(), max_len=32)
    prompt = torch.randint(0, 128, (1, 5))
    with pytest.raises(NonFiniteError, match=r"during decode at positions 0..4, first in layer 1 MLP"):
        dec.generate(prompt, 4)
    assert dec.pos == 0
    nan = make_tiny("llama")
    with torch.no_grad():
        nan.model.layers[0].input_layernorm.weight[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"weights hold NaN or Inf in \['model.layers.0.input_layernorm.weight'\]"):
        LeanDecoder(nan, max_len=32).generate(prompt, 2)
