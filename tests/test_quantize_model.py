"""quantize_ on whole models: exactness at 16 bits, KV/activation quantization really applied, errors."""
import pytest
import torch

from spinquant.eval import perplexity
from spinquant.models import attention as attn_mod
from spinquant.quant import QuantConfig, QuantEmbedding, QuantLinear, QuantSpec, preset, quantize_
from tests.conftest import make_tiny


def test_w16a16_perplexity_equals_unquantized_exactly():
    from spinquant.models import load
    model, tok = load("stories260k")
    before = perplexity(model, tok, "wikitext2", seq_len=256, max_windows=6, progress=False)
    quantize_(model, preset("W16A16"), progress=False)
    mlp = model.model.layers[0].mlp
    assert all(isinstance(m, QuantLinear) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    after = perplexity(model, tok, "wikitext2", seq_len=256, max_windows=6, progress=False)
    assert after.ppl == before.ppl and after.nll_sum == before.nll_sum


def _record_kv(model, ids):
    seen = []
    orig = attn_mod.sdpa_attention_forward

    def spy(module, q, k, v, mask, **kw):
        seen.append((k.detach().clone(), v.detach().clone()))
        return orig(module, q, k, v, mask, **kw)

    attn_mod.sdpa_attention_forward = spy
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        attn_mod.sdpa_attention_forward = orig
    return seen, logits


def test_kv_quantization_changes_attention_inputs_and_16bit_does_not():
    ids = torch.randint(0, 128, (2, 40))
    fp = make_tiny("llama")
    attn_mod.use_spinquant_attention(fp)
    kv_fp, logits_fp = _record_kv(fp, ids)

    m16 = quantize_(make_tiny("llama"), preset("W16A16"), progress=False)
    kv16, logits16 = _record_kv(m16, ids)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(kv_fp, kv16))
    assert torch.equal(logits16, logits_fp)

    kv_only = QuantConfig(kv=QuantSpec(bits=4, symmetric=False, granularity="token", dynamic=True))
    m4 = quantize_(make_tiny("llama"), kv_only, progress=False)
    kv4, logits4 = _record_kv(m4, ids)
    for (k_fp, v_fp), (k4, v4) in zip(kv_fp, kv4):
        assert not torch.equal(k4, k_fp) and not torch.equal(v4, v_fp)
        # each (batch, head, token) row of K is on a 16-level grid: at most 16 distinct values
        assert max(len(torch.unique(r)) for r in k4.reshape(-1, k4.shape[-1])) <= 16
        assert (k4 - k_fp).abs().max() < 0.5 * k_fp.abs().max()
    assert not torch.equal(logits4, logits_fp)


def test_activation_quantization_puts_linear_inputs_on_grid():
    model = quantize_(make_tiny("llama"), QuantConfig(act=QuantSpec(bits=4, symmetric=False, granularity="token",
                                                                   dynamic=True)), progress=False)
    seen = []
    down = model.model.layers[1].mlp.down_proj
    orig = torch.nn.functional.linear

    def spy(x, w, b=None):
        seen.append(x.detach())
        return orig(x, w, b)

    torch.nn.functional.linear = spy
    try:
        with torch.no_grad():
            down(torch.randn(3, 7, down.in_features))
    finally:
        torch.nn.functional.linear = orig
    assert max(len(torch.unique(r)) for r in seen[0].reshape(-1, down.in_features)) <= 16


@pytest.mark.parametrize("family,tied", [("qwen2", True), ("llama", True), ("mistral", False)])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_w8a8_close_to_fp_on_every_family(family, tied, method):
    ids = torch.randint(0, 128, (4, 32))
    fp = make_tiny(family, tied=tied)
    with torch.no_grad():
        ref = fp(ids).logits
    cfg = QuantConfig.from_dict({"scheme": "W8A8", "method": method,
                                 "embed": {"bits": 8, "granularity": "channel"},
                                 "lm_head": {"bits": 8, "granularity": "channel"}})
    q = quantize_(make_tiny(family, tied=tied), cfg, calib=torch.randint(0, 128, (8, 32)), progress=False)
    assert isinstance(q.model.embed_tokens, QuantEmbedding) and isinstance(q.lm_head, QuantLinear)
    assert not q.config.tie_word_embeddings
    with torch.no_grad():
        out = q(ids).logits
    rel = (out - ref).norm() / ref.norm()
    assert 0 < rel < 0.05
    # an 8-bit per-row embedding table has at most 256 levels per row
    assert max(len(torch.unique(r)) for r in q.model.embed_tokens.weight) <= 256


def test_group_size_not_dividing_a_layer_is_a_clear_error_unless_fallback(stories):
    from spinquant.models import load
    model, _ = load("stories260k")
    with pytest.raises(ValueError, match="group_size 32 does not divide.*172.*down_proj"):
        quantize_(model, preset("W4A8"), progress=False)
    cfg = QuantConfig.from_dict({"scheme": "W4A8", "group_fallback": "channel"})
    quantize_(model, cfg, progress=False)
    down, up = model.model.layers[0].mlp.down_proj, model.model.layers[0].mlp.up_proj
    assert down.weight_spec.granularity == "channel" and up.weight_spec.group_size == 32


def test_calibrated_method_without_calibration_data_is_a_clear_error():
    with pytest.raises(ValueError, match="needs calibration data"):
        quantize_(make_tiny("llama"), QuantConfig.from_dict({"scheme": "W4A16", "method": "gptq"}), progress=False)


def test_unknown_scheme_and_config_keys_are_clear_errors():
    with pytest.raises(KeyError, match="W4A8"):
        preset("W3A3")
    with pytest.raises(ValueError, match="unknown quant config key"):
        QuantConfig.from_dict({"scheme": "W4A8", "weights": {"bits": 3}})
    with pytest.raises(ValueError, match="unknown QuantSpec field"):
        QuantConfig.from_dict({"scheme": "W4A8", "weight": {"bit": 3}})
