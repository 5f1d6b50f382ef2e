"""Packed modules against the fake-quant modules they come from, on fresh random inputs and odd shapes."""
import pytest
import torch
import torch.nn as nn

from spinquant.kernels import PackedEmbedding, PackedLinear, choose_kernel, cpu, kernel_summary, native, pack, packed_kv_cache
from spinquant.quant import QuantConfig, QuantLinear, QuantSpec, quantize_
from spinquant.quant.rtn import rtn
from spinquant.rotation.online import OnlineHadamard
from tests.conftest import make_tiny

W4G32 = QuantSpec(bits=4, granularity="group", group_size=32)
W4G64A = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=64)
W4CH = QuantSpec(bits=4, granularity="channel")
W3G64 = QuantSpec(bits=3, granularity="group", group_size=64)
W2G64A = QuantSpec(bits=2, symmetric=False, granularity="group", group_size=64)
W8CH = QuantSpec(bits=8, granularity="channel")
W8G32 = QuantSpec(bits=8, granularity="group", group_size=32)
A8 = QuantSpec(bits=8, symmetric=False, granularity="token", dynamic=True)
A8S = QuantSpec(bits=8, symmetric=True, granularity="token", dynamic=True)
A4 = QuantSpec(bits=4, symmetric=False, granularity="token", dynamic=True, clip_ratio=0.9)


def _quant_linear(n_out, n_in, w_spec, a_spec, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n_out, n_in, generator=g) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(n_out, generator=g) * 0.1)
    return QuantLinear.from_linear(lin, rtn(lin.weight.data, w_spec), a_spec)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


CASES = [  # (w_spec, act_spec, out, in, torch-op kernel); the native kernels run the A8 / A4 cases too (below)
    (W4G32, None, 96, 256, "int4"),
    (W4G32, A8, 100, 96, "int4"),        # N not a multiple of 16, K not of 128: padded
    (W4G64A, A8, 48, 192, "int4"),
    (W4CH, A4, 40, 172, "int4"),         # stories260K's MLP width: K padded to 192
    (W3G64, None, 64, 128, "int4"),
    (W2G64A, A8, 33, 128, "int4"),
    (W8CH, A8, 72, 172, "int8"),         # _int_mm with an odd K
    (W8CH, A8S, 64, 128, "int8"),
    (W8CH, None, 50, 100, "int8"),       # _weight_int8pack_mm with K padded to 128
    (W8G32, A8, 64, 96, "dequant"),      # no kernel for 8-bit groups: the dense reference path
]


@pytest.mark.parametrize("w_spec,a_spec,n_out,n_in,kernel", CASES)
@pytest.mark.parametrize("tokens", [1, 7, 40])
def test_packed_linear_equals_fake_quant(w_spec, a_spec, n_out, n_in, kernel, tokens):
    """torch's packed ops (the kernels used where the native ones are not built)."""
    ql = _quant_linear(n_out, n_in, w_spec, a_spec, bias=True, seed=tokens)
    assert choose_kernel(w_spec) == kernel
    pl = PackedLinear.from_quant_linear(ql, kernel=kernel)
    assert pl.kernel == kernel
    x = torch.randn(2, tokens, n_in) * 2
    x[..., 3] *= 20  # an outlier channel, as in real activations
    with torch.no_grad():
        want = ql(x)
        ref = pl.reference(x).reshape(want.shape)
        got = pl(x)
    assert got.shape == want.shape and got.dtype == x.dtype
    # the packed weights dequantize to the fake-quant weights (bf16 scales): the dense reference agrees closely
    assert _rel(ref, want) < 5e-3
    # the kernel computes the same function: exact integer GEMM for _int_mm, bf16 rounding otherwise
    tol = 1e-6 if kernel == "int8" and a_spec is not None and 2 * tokens >= 16 else 1e-2
    assert _rel(got, ref) < tol, (_rel(got, ref), tol)


@pytest.mark.parametrize("spec", [W4G32, W4CH, W3G64])
def test_int4_weights_dequantize_exactly_with_bf16_representable_scales(spec):
    """With scales that bf16 represents exactly, the packed (symmetric) weights dequantize to the fake-quant
    ones bit for bit: a wrong nibble order, group index or padding would show up here."""
    ql = _quant_linear(48, 192 if spec is not W4CH else 172, spec, None)
    qw = ql.qweight
    qw.scale = qw.scale.to(torch.bfloat16).float()
    ql.weight.data = qw.dequantize()
    assert torch.equal(PackedLinear.from_quant_linear(ql).dequantized_weight(), ql.weight.data)


def test_int4_asymmetric_zero_points_within_bf16_rounding():
    ql = _quant_linear(48, 192, W2G64A, None)
    err = (PackedLinear.from_quant_linear(ql).dequantized_weight() - ql.weight.data).abs()
    step = ql.qweight.scale.reshape(48, -1).repeat_interleave(64, 1)
    assert (err <= step / 64).all()  # the float zero (<= 2 steps for 2 bits) is rounded to bf16


@pytest.mark.parametrize("n,k", [(16, 32), (48, 96), (32, 256)])
def test_int4_unpack_inverts_the_kernel_layout(n, k):
    u = torch.randint(0, 16, (n, k), dtype=torch.int32)
    assert torch.equal(cpu.unpack_int4(cpu.pack_int4(u), n, k).to(torch.int32), u)


def test_int4_pack_refuses_unpadded_shapes():
    with pytest.raises(ValueError, match="N % 16"):
        cpu.pack_int4(torch.zeros(10, 64, dtype=torch.int32))


def test_kernel_choice():
    assert choose_kernel(W4G32) == "int4"
    assert choose_kernel(QuantSpec(bits=4, granularity="group", group_size=16)) == "dequant"
    assert choose_kernel(QuantSpec(bits=8, symmetric=False)) == "dequant"
    assert choose_kernel(W8CH) == "int8"
    # quantized per-token activations: the native kernels where they run (AVX-512 VNNI, as on CI's machine),
    # even for groups torch's op refuses; torch's ops elsewhere
    nat = native.available()
    assert choose_kernel(W4G32, A8) == ("cpu_w4a8" if nat else "int4")
    assert choose_kernel(W8CH, A8S) == ("cpu_w8a8" if nat else "int8")
    assert choose_kernel(QuantSpec(bits=4, granularity="group", group_size=16), A4) == ("cpu_w4a8" if nat else "dequant")
    assert choose_kernel(W8G32, A8) == "dequant"
    assert choose_kernel(W4G32, QuantSpec(bits=8, granularity="tensor", dynamic=True)) == "int4"


def test_online_hadamard_and_adapter_run_in_the_packed_forward():
    from spinquant.qat.lora import LoRA
    ql = _quant_linear(64, 128, W4G32, A8)
    ql.input_transform = OnlineHadamard(128)
    ql.adapter = LoRA(128, 64, rank=4, alpha=8.0)
    with torch.no_grad():
        ql.adapter.B.normal_(0, 0.1)
    pl = PackedLinear.from_quant_linear(ql)
    x = torch.randn(5, 128)
    with torch.no_grad():
        assert _rel(pl(x), ql(x)) < 1e-2
        no_had = PackedLinear.from_quant_linear(ql)
        no_had.input_transform = None
        assert _rel(no_had(x), ql(x)) > 0.3  # the transform really is applied


def test_packed_embedding_rows():
    w = torch.randn(50, 64)
    for spec in (QuantSpec(bits=8), QuantSpec(bits=8, symmetric=False)):
        qw = rtn(w, spec)
        pe = PackedEmbedding.from_codes(qw.codes, qw.scale, None if spec.symmetric else qw.zero, spec, dtype=torch.float32)
        ids = torch.randint(0, 50, (3, 7))
        assert torch.allclose(pe(ids), qw.dequantize()[ids], atol=1e-6)


# 4-bit activations re-round the kernels' bf16 output rounding (0.2 % per layer, checked per layer above)
# at every layer, so whole-model logits drift further apart at A4 than at A8/A16.
@pytest.mark.parametrize("scheme,tol", [("W4A8", 2e-2), ("W4A16", 2e-2), ("W8A8", 2e-2), ("W4A4KV4", 0.15)])
def test_packed_model_logits_match_fake_quant(scheme, tol):
    model = make_tiny("llama", hidden=64, intermediate=192, vocab=160)
    cfg = QuantConfig.from_dict({"scheme": scheme, "embed": {"bits": 8}, "lm_head": {"bits": 8},
                                 "lm_head_act": {"bits": 8, "symmetric": False, "granularity": "token",
                                                 "dynamic": True}})
    quantize_(model, cfg, progress=False)
    for m in model.modules():  # bf16 scales in both paths: what remains is the kernels' arithmetic
        if isinstance(m, QuantLinear) and m.qweight is not None:
            m.qweight.scale = m.qweight.scale.to(torch.bfloat16).float()
            m.weight.data = m.qweight.dequantize()
    ids = torch.randint(0, 160, (2, 24))
    with torch.no_grad():
        want = model(ids).logits
        pack(model, dtype=torch.float32)
        got = model(ids).logits
    s = kernel_summary(model)
    assert sum(s.values()) == 2 * 7 + 1 and "dequant" not in s
    assert _rel(got, want) < tol


@pytest.mark.parametrize("lm_head_act,kernel", [(None, "int8"), (A8.to_dict(), "cpu_w8a8" if native.available() else "int8")])
def test_tied_int8_table_is_shared(lm_head_act, kernel):
    model = make_tiny("llama", tied=True, vocab=120)  # 120 rows: the native tiles pad the vocabulary to 128
    cfg = QuantConfig.from_dict({"scheme": "W4A16", "embed": {"bits": 8}, "lm_head": {"bits": 8},
                                 "lm_head_act": lm_head_act})
    quantize_(model, cfg, progress=False)
    ids = torch.randint(0, 120, (2, 9))
    with torch.no_grad():
        want = model.get_input_embeddings()(ids)
    pack(model, dtype=torch.float32)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert head.kernel == kernel and emb.codes.data_ptr() == head.int8_table().data_ptr()
    with torch.no_grad():
        assert torch.allclose(emb(ids), want, atol=1e-6)  # rows read back from the shared table


def test_pack_needs_a_quantized_model():
    with pytest.raises(ValueError, match="quantize_"):
        pack(make_tiny("llama"))


def test_stories260k_packs_and_keeps_perplexity(stories):
    import copy

    from spinquant.eval import perplexity
    model, tok = stories
    model = copy.deepcopy(model)
    quantize_(model, QuantConfig.from_dict({"scheme": "W4A8", "group_fallback": "channel"}), progress=False)
    fq = perplexity(model, tok, "wikitext2", seq_len=256, max_windows=4, progress=False).ppl
    pack(model, dtype=torch.float32)
    assert "dequant" not in kernel_summary(model)
    pk = perplexity(model, tok, "wikitext2", seq_len=256, max_windows=4, progress=False).ppl
    assert abs(pk - fq) / fq < 5e-3, (fq, pk)


def _decode_vs_full(model, ids, prefill: int):
    """(logits of a prefill + one-token decode steps through packed_kv_cache, logits of one full forward, cache)."""
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
        cache = packed_kv_cache(model)
        steps = [model(ids[:, :prefill], past_key_values=cache, use_cache=True).logits]
        steps += [model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(prefill, ids.shape[1])]
    return torch.cat(steps, dim=1), want, cache


def test_rotated_key_cache_decode_equals_full_forward():
    """R3 without KV quantization: keys are rotated once on entry (RotatedKeyLayer), same logits as the full
    forward, and the attention does not rotate them a second time."""
    from spinquant import rotation
    from spinquant.kernels.kv_cache import RotatedKeyLayer
    model = make_tiny("llama", hidden=64, intermediate=128, vocab=128)
    rotation.apply(model, {"name": "quarot", "seed": 0})
    # weight-only: quantized activations would make the comparison hinge on rounding ties, since prefill and full
    # forward sum in different orders (an 8-bit activation code that flips moves a logit by ~1e-3)
    quantize_(model, QuantConfig.from_dict({"scheme": "W4A16"}), progress=False)
    pack(model, dtype=torch.float32)
    got, want, cache = _decode_vs_full(model, torch.randint(0, 128, (1, 20)), prefill=12)
    assert all(isinstance(layer, RotatedKeyLayer) for layer in cache.layers)
    assert _rel(got, want) < 1e-5


def test_r3_is_applied_once_even_when_the_cache_hands_the_attention_a_copy(monkeypatch):
    """The cache says explicitly that its K/V are rotated (its layer's `applies_attention_hooks`, read per call from
    the cache the decoder layer passes), not through a mark on the key tensor: K/V copied between the cache and the
    attention (the mark lost) still match the full forward, while a second R3 (what the mark alone allowed) does not.
    Where the attention is not told of the cache (a transformers rename of its argument) a marked K/V is an error."""
    from spinquant import rotation
    from spinquant.kernels import kv_cache
    from spinquant.models import attention
    model = make_tiny("llama", hidden=64, intermediate=128, vocab=128)
    rotation.apply(model, {"name": "quarot", "seed": 0})
    ids = torch.randint(0, 128, (1, 20))
    update = kv_cache._OwnedLayer.update

    def copied(self, k, v, *a, **kw):  # what a transformers change copying K/V on the way would do
        keys, values = update(self, k, v, *a, **kw)
        return keys.clone(), values.clone()
    monkeypatch.setattr(kv_cache._OwnedLayer, "update", copied)
    got, want, _ = _decode_vs_full(model, ids, prefill=12)
    assert _rel(got, want) < 1e-5
    monkeypatch.setattr(kv_cache._OwnedLayer, "applies_attention_hooks", False)  # the attention rotates again
    twice, _, _ = _decode_vs_full(model, ids, prefill=12)
    assert _rel(twice, want) > 1e-2
    monkeypatch.setattr(kv_cache._OwnedLayer, "update", update)
    monkeypatch.setattr(kv_cache._OwnedLayer, "applies_attention_hooks", True)
    monkeypatch.setattr(attention, "CACHE_ARGS", ("no_such_argument",))
    with pytest.raises(RuntimeError, match="would undo R3"):
        _decode_vs_full(model, ids, prefill=12)


def test_activation_codes_follow_an_input_changed_in_place_under_inference_mode():
    """The reproduction of the stale-code bug: a packed linear called twice on one tensor changed in place between
    the calls (inference-mode tensors have no version counter) must see the new values. No codes are cached
    across calls, so this holds by construction, on every kernel of the CPU backend."""
    for scheme, torch_kernel in (("W4A8", "int4"), ("W8A8", "int8")):
        cfg = QuantConfig(scheme=scheme)
        ql = QuantLinear.from_linear(nn.Linear(64, 32, bias=False), rtn(torch.randn(32, 64), cfg.weight), cfg.act)
        for kernel in {torch_kernel, choose_kernel(ql.weight_spec, ql.act_spec)}:
            _check_fresh_codes(PackedLinear.from_quant_linear(ql, kernel))


def _check_fresh_codes(pl):
    with torch.inference_mode():
        x = torch.randn(3, 64)
        first = pl(x)
        x.mul_(2)
        second = pl(x)
        assert torch.allclose(second, pl(x.clone()), atol=1e-6) and not torch.allclose(first, second), pl.kernel


@pytest.mark.parametrize("scheme,kv_bits", [("W4A4KV4", 4), ("W4A8KV8", 8)])
def test_packed_kv_cache_decode_equals_full_forward(scheme, kv_bits):
    """Prefill + token-by-token decode through the packed KV cache gives the logits of one full forward of the
    fake-quant model (which quantizes K/V after RoPE and R3), and stores K/V at their bit-width."""
    from spinquant import rotation
    from spinquant.kernels.kv_cache import PackedKVLayer, cache_nbytes
    model = make_tiny("llama", hidden=64, intermediate=128, vocab=128)
    rotation.apply(model, {"name": "quarot", "seed": 0})  # R3 on Q/K: the cache must store transformed keys
    quantize_(model, QuantConfig.from_dict({"scheme": scheme}), progress=False)
    got, want, cache = _decode_vs_full(model, torch.randint(0, 128, (2, 24)), prefill=16)
    assert all(isinstance(layer, PackedKVLayer) for layer in cache.layers)
    assert _rel(got, want) < 1e-5
    hd, kvh, layers = 16, 2, 2
    fp16_bytes = 2 * layers * 2 * kvh * 24 * hd * 2  # K and V, batch 2, 24 tokens, 16-bit
    assert 0 < cache_nbytes(cache) < fp16_bytes * (kv_bits + 2 * 32 / hd) / 16 + 1  # codes + fp32 scale/zero per token
    assert cache.get_seq_length() == 24


@pytest.mark.parametrize("spec", [A8, A8S, A4, QuantSpec(bits=6, symmetric=False, granularity="token", dynamic=True,
                                                           clip_ratio=0.8)])
def test_token_codes_are_bit_identical_to_fake_quantize(spec):
    from spinquant.kernels import token_codes
    from spinquant.quant import fake_quantize
    x = torch.randn(33, 96) * torch.rand(33, 1) * 5
    x[4] = 0.0  # an all-zero token
    x[7, 5] = 300.0
    v, z, s = token_codes(x, spec)
    assert torch.equal((v - z) * s, fake_quantize(x, spec))
    assert v.min() >= spec.qmin and v.max() <= spec.qmax and torch.equal(v, v.round())


def test_pack_refuses_a_model_off_the_cpu():
    model = make_tiny("llama")
    quantize_(model, QuantConfig.from_dict({"scheme": "W4A16"}), progress=False)
    norm = model.model.norm
    norm.weight = nn.Parameter(torch.empty_like(norm.weight, device="meta"))
    with pytest.raises(ValueError, match="builds CPU kernels"):
        pack(model)


def test_packed_kv_cache_keeps_transformers_cache_contract():
    """The layers implement transformers' public cache-layer contract only (no attribute of its own layer classes):
    `generate` through the packed cache gives the greedy tokens of the cache-free model, and `reset` empties it."""
    from transformers.cache_utils import CacheLayerMixin

    from spinquant import rotation
    from spinquant.kernels.kv_cache import PackedKVLayer
    model = make_tiny("llama", hidden=64, intermediate=128, vocab=128)
    rotation.apply(model, {"name": "quarot", "seed": 0})
    quantize_(model, QuantConfig.from_dict({"scheme": "W16A16", "kv": {"bits": 8, "granularity": "token",
                                                                       "dynamic": True, "symmetric": False}}),
              progress=False)
    ids = torch.randint(0, 128, (1, 6))
    cache = packed_kv_cache(model)
    assert all(isinstance(layer, PackedKVLayer) and isinstance(layer, CacheLayerMixin) for layer in cache.layers)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        seq = ids
        for _ in range(5):  # greedy decoding without a cache: every step a full forward
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)
    assert cache.get_seq_length() == ids.shape[1] + 4  # the last token is generated, never fed back
    cache.reset()
    assert cache.get_seq_length() == 0


def test_a_new_layout_is_one_registered_class():
    """Adding a layout: one PackedLinear subclass with @register_layout; pack / save / load then know it, and it
    shares the portable save format of its weight form (here int8, reloaded onto the built-in int8 layout)."""
    from spinquant.kernels import LAYOUTS, layout, register_layout
    from spinquant.kernels.layouts.torch_int8 import TorchInt8Linear

    @register_layout
    class FloatInt8Linear(TorchInt8Linear):  # int8 storage, multiplied in float32 (a toy layout)
        kernel, portable = "toy_int8", "int8"

        def matmul(self, x, out_dtype):
            return self.quantized_input(x) @ self.dequantized_weight().t()

    try:
        assert layout("toy_int8") is FloatInt8Linear
        cfg = QuantConfig(scheme="W8A8")
        ql = QuantLinear.from_linear(nn.Linear(64, 24, bias=True), rtn(torch.randn(24, 64), cfg.weight), cfg.act)
        toy = PackedLinear.from_quant_linear(ql, "toy_int8")
        x = torch.randn(5, 64)
        assert isinstance(toy, FloatInt8Linear) and torch.allclose(toy(x), toy.reference(x), atol=1e-5)
        back = PackedLinear.from_export(toy.export_tensors(), 64, 24, ql.weight_spec, ql.act_spec, "int8")
        assert type(back).kernel == "int8" and torch.equal(back.dequantized_weight(), toy.dequantized_weight())
        with pytest.raises(ValueError, match="unknown kernel 'nope'"):
            layout("nope")
    finally:
        LAYOUTS.pop("toy_int8")
