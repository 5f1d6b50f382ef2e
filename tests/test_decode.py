"""The lean decode path (spinquant.decode): same function as the Hugging Face forward with a packed KV cache,
fused projections that share the model's weights, static caches, and the one-token attention kernel."""
import pytest
import torch
import torch.nn as nn

from spinquant.decode import LeanDecoder
from spinquant.kernels import PackedLinear, native, pack
from spinquant.kernels.fuse import fuse_linears
from spinquant.kernels.kv_cache import StaticKV, StaticPackedKV
from spinquant.quant import QuantConfig, QuantLinear, QuantSpec, quantize_
from spinquant.quant.rtn import rtn
from tests.conftest import make_tiny, skip_outside_ci
from tests.test_kernels import _decode_vs_full


@pytest.fixture
def needs_native():
    """spinquant's C kernels: skipped on a developer machine where they do not build, a failure under CI."""
    if not native.builds():
        skip_outside_ci("spinquant's C kernels do not build here")


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _hf_steps(model, ids, prefill):
    """Logits of a prefill + one-token steps through the model's own forward and packed KV cache."""
    return _decode_vs_full(model, ids, prefill)[0].float()


def _lean_steps(dec, ids, prefill):
    dec.reset()
    steps = [dec.forward(ids[:, :prefill], all_logits=True)]
    steps += [dec.forward(ids[:, t:t + 1], all_logits=True) for t in range(prefill, ids.shape[1])]
    return torch.cat(steps, 1)


@pytest.mark.parametrize("family,scheme,rot", [
    ("llama", "W4A8", None),            # native int4 kernel, fused q/k/v and gate/up
    ("qwen2", "W4A8KV8", "quarot"),     # q/k/v bias, online R3 + R4, an int8 KV cache
    ("mistral", "W4A4KV4", "quarot"),   # 4-bit activations and KV cache
    ("llama", "W8A8", None),            # int8 weights
    ("llama", None, None),              # the 16-bit model (projections unfused)
])
def test_lean_decoder_equals_the_models_forward(family, scheme, rot):
    """Prefill + token-by-token decode through the lean path gives the logits of the model's own forward with its
    packed KV cache, on random weights and ids (float32 compute: differences are summation order only)."""
    from spinquant import rotation
    model = make_tiny(family, hidden=64, intermediate=128, vocab=128, seed=3)
    if rot:
        rotation.apply(model, {"name": rot, "seed": 0})
    if scheme:
        quantize_(model, QuantConfig.from_dict({"scheme": scheme}), progress=False)
        pack(model, dtype=torch.float32)
    ids = torch.randint(0, 128, (2, 21), generator=torch.Generator().manual_seed(1))
    want = _hf_steps(model, ids, prefill=13)
    dec = LeanDecoder(model, max_len=24, batch_size=2)
    got = _lean_steps(dec, ids, prefill=13)
    assert got.shape == want.shape
    assert _rel(got, want) < 1e-5
    if scheme and "KV" in scheme:
        assert all(isinstance(layer.cache, StaticPackedKV) for layer in dec.layers)
    # the model's own forward still works after its projections became views of the fused weights
    assert _rel(_hf_steps(model, ids, prefill=13), want) < 1e-6


def test_lean_decoder_on_stories260k_in_bf16_matches_and_generates_greedily(stories):
    """The real pretrained model packed at W4A8 in bf16: lean logits close to the model's forward (bf16 rounding
    only), and greedy generation equals argmax decoding through the model's forward."""
    model = stories[0]
    import copy
    model = copy.deepcopy(model)
    quantize_(model, QuantConfig.from_dict({"scheme": "W4A8", "group_fallback": "channel"}), progress=False)
    pack(model)
    ids = torch.randint(3, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(2))
    want = _hf_steps(model, ids, prefill=32)
    dec = LeanDecoder(model, max_len=64)
    got = _lean_steps(dec, ids, prefill=32)
    assert _rel(got, want) < 2e-2, _rel(got, want)
    new = dec.generate(ids[:, :16], max_new_tokens=8)
    with torch.no_grad():
        seq = ids[:, :16]
        for _ in range(8):
            seq = torch.cat([seq, model(seq).logits[:, -1:].float().argmax(-1)], 1)
    agree = (new == seq[:, 16:]).float().mean().item()
    assert agree >= 0.75, (new, seq[:, 16:])


@pytest.mark.usefixtures("needs_native")
def test_lean_decoder_rotates_queries_and_keys_on_the_native_fwht_in_bf16():
    """A QuaRot model packed in bf16: the lean path's online R3 is native.fwht (one rounding instead of the module's
    one per butterfly stage), so its logits stay within bf16 rounding of the model's own forward."""
    from unittest import mock

    from spinquant import rotation
    model = make_tiny("qwen2", hidden=64, intermediate=128, vocab=128, seed=4)
    rotation.apply(model, {"name": "quarot", "seed": 0})
    quantize_(model, QuantConfig.from_dict({"scheme": "W4A8KV8"}), progress=False)
    pack(model, dtype=torch.bfloat16)
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(5))
    want = _hf_steps(model, ids, prefill=12)
    dec = LeanDecoder(model, max_len=24)
    with mock.patch.object(native, "fwht", wraps=native.fwht) as spy:
        got = _lean_steps(dec, ids, prefill=12)
    assert spy.call_count == 2 * len(dec.layers) * (1 + ids.shape[1] - 12)  # queries and keys, every layer and call
    assert _rel(got, want) < 1.5e-2, _rel(got, want)  # 6.5e-3 measured (4.0e-3 with the module's R3)


def _linears(n_out, spec, act, k=64, seed=0):
    torch.manual_seed(seed)
    return [QuantLinear.from_linear(nn.Linear(k, n, bias=False), rtn(torch.randn(n, k), spec), act) for n in n_out]


@pytest.mark.parametrize("kernel", ["cpu_w4a8", "cpu_w8a8", "int8", "dequant"])
def test_fused_linear_equals_its_parts_and_shares_their_weights(kernel):
    if kernel.startswith("cpu_") and not native.builds():
        skip_outside_ci("spinquant's C kernels do not build here")
    w = QuantSpec(bits=4 if kernel in ("cpu_w4a8", "dequant") else 8, symmetric=True, granularity="group" if
                  kernel == "cpu_w4a8" else "channel", group_size=32 if kernel == "cpu_w4a8" else None)
    act = QuantSpec(bits=8, symmetric=False, granularity="token", dynamic=True)
    parts = [PackedLinear.from_quant_linear(q, kernel) for q in _linears([48, 16, 16], w, act)]
    x = torch.randn(5, 64)
    want = torch.cat([p(x) for p in parts], -1)
    before = sum(b.numel() * b.element_size() for p in parts for b in p.buffers())
    fused = fuse_linears(parts)
    assert fused is not None and fused.out_features == 80
    assert torch.allclose(fused(x), want, atol=1e-5)
    assert torch.allclose(torch.cat([p(x) for p in parts], -1), want, atol=1e-6)  # the parts still compute the same
    fused_ptrs = {b.untyped_storage().data_ptr() for b in fused.buffers()}
    assert all(b.untyped_storage().data_ptr() in fused_ptrs for p in parts for b in p.buffers())  # views, one copy
    assert sum(b.numel() * b.element_size() for b in fused.buffers()) == before


def test_fused_dense_linears_equal_their_parts_and_share_their_weights():
    parts = [nn.Linear(64, n) for n in (48, 16, 16)]
    x = torch.randn(5, 64)
    want = torch.cat([p(x) for p in parts], -1)
    fused = fuse_linears(parts)
    assert torch.allclose(fused(x), want, atol=1e-6)
    assert all(p.weight.untyped_storage().data_ptr() == fused.weight.untyped_storage().data_ptr() for p in parts)
    assert torch.allclose(torch.cat([p(x) for p in parts], -1), want, atol=1e-6)


def test_fusion_declines_what_cannot_share_one_matmul():
    w = QuantSpec(bits=4, symmetric=True, granularity="group", group_size=32)
    act = QuantSpec(bits=8, symmetric=False, granularity="token", dynamic=True)
    q = _linears([32, 32], w, act)
    assert fuse_linears([PackedLinear.from_quant_linear(m, "int4") for m in q]) is None  # torch's int4 pack: groups first
    parts = [PackedLinear.from_quant_linear(m, "dequant") for m in q]
    parts[1].adapter = nn.Linear(64, 32)
    assert fuse_linears(parts) is None  # a per-projection adapter
    mixed = [PackedLinear.from_quant_linear(q[0], "dequant"), nn.Linear(64, 32)]
    assert fuse_linears(mixed) is None
    dense = [nn.Linear(64, 32), nn.Linear(64, 16, bias=False)]
    assert fuse_linears(dense) is None  # bias on one only


def test_static_caches_hold_what_was_written():
    from spinquant.kernels.kv_cache import _Codes
    spec = QuantSpec(bits=4, symmetric=False, granularity="token", dynamic=True, clip_ratio=0.95)
    k, v = torch.randn(2, 3, 7, 16), torch.randn(2, 3, 7, 16)
    plain = StaticKV(2, 3, 10, 16, torch.float32)
    plain.write(0, k[:, :, :5], v[:, :, :5])
    plain.write(5, k[:, :, 5:], v[:, :, 5:])
    assert torch.equal(plain.read(7)[0], k) and torch.equal(plain.read(7)[1], v)
    kt, vf = plain.flat(7)
    assert kt.is_contiguous() and torch.equal(kt.view(2, 3, 16, 10)[..., :7], k.transpose(-1, -2))
    packed = StaticPackedKV(2, 3, 10, 16, torch.float32, spec, spec)
    packed.write(0, k[:, :, :4], v[:, :, :4])
    packed.write(4, k[:, :, 4:], v[:, :, 4:])
    ref = _Codes(spec)
    ref.append(k)
    assert torch.equal(packed.read(7)[0], ref.values(torch.float32))
    assert packed.nbytes() < plain.nbytes()
    with pytest.raises(ValueError, match="per-token"):
        StaticPackedKV(1, 1, 4, 16, torch.float32, QuantSpec(bits=16), spec)


@pytest.mark.usefixtures("needs_native")
@pytest.mark.parametrize("dtype,g,d,length", [(torch.bfloat16, 4, 64, 513), (torch.float32, 3, 24, 37),
                                               (torch.bfloat16, 8, 128, 16), (torch.float32, 1, 8, 1)])
def test_one_token_attention_kernel_matches_float64(dtype, g, d, length):
    """native.attend_one_token against softmax(q kᵀ·scale) v in float64, on random inputs: group sizes with and
    without an unrolled path, head dims and lengths that are and are not multiples of 16."""
    H, L = 5, length + 7
    q = torch.randn(H, g, d)
    k, v = torch.randn(H, L, d).to(dtype), torch.randn(H, L, d).to(dtype)
    got = native.attend_one_token(q, k.transpose(1, 2).contiguous(), v, length, d ** -0.5)
    p = torch.softmax(q.double() @ k[:, :length].double().transpose(1, 2) * d ** -0.5, -1)
    want = p @ v[:, :length].double()
    assert (got.double() - want).abs().max().item() < 1e-5


@pytest.mark.usefixtures("needs_native")
def test_one_token_attention_kernel_refuses_bad_arguments():
    q, kt, v = torch.randn(2, 4, 16), torch.randn(2, 16, 10), torch.randn(2, 10, 16)
    with pytest.raises(ValueError, match="length"):
        native.attend_one_token(q, kt, v, 11, 0.25)
    with pytest.raises(ValueError, match="bf16 or float32"):
        native.attend_one_token(q, kt.double(), v.double(), 5, 0.25)
    with pytest.raises(ValueError, match="contiguous"):
        native.attend_one_token(q, kt.transpose(1, 2).contiguous().transpose(1, 2), v, 5, 0.25)
    with pytest.raises(ValueError, match="keys_t"):
        native.attend_one_token(q, torch.randn(2, 8, 10), v, 5, 0.25)


def test_lean_decoder_refuses_before_running():
    model = make_tiny("llama")
    with pytest.raises(ValueError, match="context"):
        LeanDecoder(model, max_len=1000)
    dec = LeanDecoder(model, max_len=8)
    with pytest.raises(ValueError, match="exceed max_len"):
        dec.forward(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="batch_size"):
        dec.forward(torch.zeros(2, 3, dtype=torch.long))
    dec.forward(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="5 cached"):
        dec.forward(torch.zeros(1, 4, dtype=torch.long))
    mistral = make_tiny("mistral")
    mistral.config.sliding_window = 16
    for layer in mistral.model.layers:
        layer.self_attn.sliding_window = 16
    with pytest.raises(ValueError, match="sliding"):
        LeanDecoder(mistral, max_len=32)


def test_lean_decoder_without_native_kernels_is_the_same_function(monkeypatch):
    """SPINQUANT_NATIVE=0: torch's attention for one token, same logits."""
    model = make_tiny("llama", seed=5)
    ids = torch.randint(0, 128, (1, 12))
    want = _lean_steps(LeanDecoder(model, max_len=16), ids, prefill=6)
    monkeypatch.setenv("SPINQUANT_NATIVE", "0")
    dec = LeanDecoder(model, max_len=16)
    assert not dec.native_attention
    assert _rel(_lean_steps(dec, ids, prefill=6), want) < 1e-6
