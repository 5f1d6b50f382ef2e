"""QAT building blocks: STE / LSQ gradients against references, LoRA no-op start, prepare -> convert
equality, QA-LoRA merge that keeps the integer grid, and clear errors."""
import math

import pytest
import torch
from conftest import make_tiny

from spinquant.qat.fake_quant import FakeQuantLinear, QATConfig, convert, prepare
from spinquant.qat.lora import LoRA
from spinquant.quant import QuantConfig, QuantSpec


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _fq_linear(spec, learn=False, in_f=64, out_f=8, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f)
    return FakeQuantLinear(lin, spec, None, learn_scales=learn, train_weight=True)


@pytest.mark.parametrize("spec", [QuantSpec(bits=4), QuantSpec(bits=3, symmetric=False, granularity="group", group_size=16)])
def test_ste_gradient_is_identity_inside_the_clip_range_and_zero_outside(spec):
    fq = _fq_linear(spec)
    with torch.no_grad():
        fq.scale.mul_(0.5)  # shrink the grid so that some weights fall outside it
    G = torch.randn_like(fq.weight)
    (fq.fake_weight() * G).sum().backward()
    wg = fq.weight.detach().reshape(fq.out_features, -1, spec.group_size or fq.in_features)
    v = wg / fq.scale.detach() + fq.zero
    inside = ((v.round() >= spec.qmin) & (v.round() <= spec.qmax)).reshape(fq.weight.shape)
    assert 0 < inside.float().mean() < 1  # both cases occur
    assert torch.allclose(fq.weight.grad[inside], G[inside], rtol=1e-6, atol=0)  # (1/s)·s rounding only
    assert torch.all(fq.weight.grad[~inside] == 0)


def test_lsq_scale_gradient_matches_a_finite_difference_of_the_ste_surrogate():
    spec = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=16)
    fq = _fq_linear(spec, learn=True)
    with torch.no_grad():
        fq.scale.mul_(0.7)  # some codes clamp
    G = torch.randn_like(fq.weight)
    (fq.fake_weight() * G).sum().backward()
    auto = fq.scale.grad.double()
    # reference: round() linearised at the current point (the STE), clamp kept, central differences in float64
    W, z = fq.weight.detach().double().reshape(fq.out_features, -1, 16), fq.zero.double()
    s0 = fq.scale.detach().double()
    v0 = W / s0
    r0 = v0.round()
    Gg = G.double().reshape(W.shape)

    def surrogate(s):
        q = r0 + (W / s - v0) + z
        clamped = (r0 + z).clamp(spec.qmin, spec.qmax)
        q = torch.where((r0 + z >= spec.qmin) & (r0 + z <= spec.qmax), q, clamped)
        return ((q - z) * s * Gg).sum(-1, keepdim=True)

    h = 1e-6
    fd = (surrogate(s0 + h) - surrogate(s0 - h)) / (2 * h)
    g = 1 / math.sqrt(fq.weight.numel() * spec.qmax)  # LSQ gradient scale
    assert torch.allclose(auto, fd * g, rtol=1e-4, atol=1e-7)


def test_lora_starts_as_an_exact_no_op_and_trains_only_adapters():
    ids = torch.randint(0, 128, (2, 16))
    q = QuantConfig.from_dict({"scheme": "W4A8"})
    base = prepare(make_tiny("llama", hidden=64, intermediate=128), q, QATConfig(mode="lora", lora_targets=()))
    lora = prepare(make_tiny("llama", hidden=64, intermediate=128), q, QATConfig(mode="lora", lora_rank=4))
    assert torch.equal(_logits(base, ids), _logits(lora, ids))
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all(".lora." in n for n in trainable)
    full = prepare(make_tiny("llama"), q, QATConfig(mode="full", scales="learnable"))
    names = {n.rsplit(".", 1)[-1] for n, p in full.named_parameters() if p.requires_grad}
    assert names == {"weight", "scale"}


@pytest.mark.parametrize("scheme,mode", [("W4A8", "full"), ("W4A4KV4", "full"), ("W4A8", "lora")])
def test_convert_reproduces_the_fake_quant_model_bit_for_bit(scheme, mode):
    """After real training steps (weights, LSQ scales or LoRA moved by their gradients), the converted integer
    model computes exactly the logits of the prepared fake-quant model (torchao's contract)."""
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, 16))
    q = QuantConfig.from_dict({"scheme": scheme})
    model = prepare(make_tiny("llama", hidden=64, intermediate=128), q, QATConfig(mode=mode, scales="learnable"))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(ids).logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    if mode == "lora":
        with torch.no_grad():  # B starts at zero; make the adapters matter
            for m in model.modules():
                if isinstance(m, LoRA):
                    m.B.normal_(0, 0.05)
    ref = _logits(model, ids)
    convert(model)
    assert torch.equal(_logits(model, ids), ref)
    down = model.model.layers[0].mlp.down_proj
    assert down.qweight is not None and down.qweight.codes.dtype == torch.int8


def test_prepared_and_converted_stories260k_are_bit_identical():
    """The same on the real pretrained model, W4A8 (g32 weights with per-channel fallback, int8 activations)."""
    from spinquant.models import load
    model, tok = load("stories260k")
    ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    q = QuantConfig.from_dict({"scheme": "W4A8", "group_fallback": "channel"})
    prepare(model, q, QATConfig(mode="full", scales="learnable"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(2):
        out = model(ids).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    ref = _logits(model, ids)
    convert(model)
    assert torch.equal(_logits(model, ids), ref)


def test_merged_qa_lora_keeps_the_grid_and_equals_the_unmerged_model():
    ids = torch.randint(0, 128, (2, 16))
    q = QuantConfig.from_dict({"scheme": "W4A8"})  # g32 weights
    cfg = QATConfig(mode="lora", lora_rank=1, qa_lora=True)
    a = prepare(make_tiny("llama", hidden=64, intermediate=128), q, cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for m in a.modules():
            if isinstance(m, LoRA):
                m.B.normal_(0, 0.05)
    b = prepare(make_tiny("llama", hidden=64, intermediate=128), q, cfg)
    b.load_state_dict(a.state_dict())
    trained = _logits(a, ids)
    assert not torch.allclose(trained, _logits(prepare(make_tiny("llama", hidden=64, intermediate=128), q,
                                                       QATConfig(lora_targets=())), ids))
    convert(a, merge=False)
    convert(b, merge=True)
    ua, mb = a.model.layers[0].self_attn.q_proj, b.model.layers[0].self_attn.q_proj
    assert ua.adapter is not None and mb.adapter is None
    assert torch.equal(ua.qweight.codes, mb.qweight.codes)  # same integer codes, only zero-points moved
    assert not torch.equal(ua.qweight.zero, mb.qweight.zero)
    assert (_logits(b, ids) - _logits(a, ids)).abs().max() < 1e-5 * trained.abs().max()
    assert (_logits(a, ids) - trained).abs().max() < 1e-5 * trained.abs().max()


def test_bad_qat_input_is_a_clear_error():
    q = QuantConfig.from_dict({"scheme": "W4A8"})
    with pytest.raises(ValueError, match=r"LoRA target module\(s\) \['attn'\] do not exist"):
        QATConfig(lora_targets=("q", "attn"))
    with pytest.raises(ValueError, match="LoRA rank 200 on layer 0 q_proj must be in 1..64"):
        prepare(make_tiny("llama", hidden=64, intermediate=128), q, QATConfig(lora_rank=200))
    plain = prepare(make_tiny("llama", hidden=64, intermediate=128), q, QATConfig(lora_rank=2))
    with pytest.raises(ValueError, match="only QA-LoRA adapters"):
        convert(plain, merge=True)


def test_qat_refuses_a_spec_other_than_the_loaded_rotations(tmp_path):
    from spinquant import qat, rotation
    cfg = {"name": "spinquant", "steps": 1, "batch_size": 1, "heldout": 1, "progress": False, "train_quant": "auto",
           "save": str(tmp_path / "r.pt")}
    rotation.apply(make_tiny("llama", hidden=48), cfg, torch.randint(0, 128, (2, 16)),
                   target=QuantConfig.from_dict({"scheme": "W4A4KV4", "method": "gptq"}))
    model = rotation.apply(make_tiny("llama", hidden=48), {"name": "spinquant", "load": str(tmp_path / "r.pt")})
    qat.check_rotation_spec(model, QuantConfig.from_dict({"scheme": "W4A4KV4"}))  # same A/KV bits: fine
    with pytest.raises(ValueError, match="QAT spec A8KV16 disagrees with the rotation .*r.pt, learned for A4KV4"):
        qat.check_rotation_spec(model, QuantConfig.from_dict({"scheme": "W4A8"}))
