"""ExecuTorch export: our integer weights reach XNNPACK unchanged (a one-linear program fed the identity returns our
dequantized weights), the whole model's .pte runs in ExecuTorch's runtime and matches our packed model (stated
tolerance), R4 runs through ExecuTorch's own Hadamard op, and what the program cannot hold is refused early."""
import copy

import pytest
import torch

from tests.conftest import require

require("executorch")
require("torchao")

from spinquant import kernels, rotation  # noqa: E402
from spinquant.deploy import ExecuTorchLM  # noqa: E402
from spinquant.et_export import (  # noqa: E402
    ETExportError,
    ExecuTorchHadamard,
    ExecuTorchLinear,
    check_config,
    export_executorch,
    to_executorch_modules,
)
from spinquant.quant import QuantConfig, QuantLinear, QuantSpec, quantize_  # noqa: E402
from spinquant.quant.rtn import rtn  # noqa: E402
from spinquant.quant.schemes import preset  # noqa: E402
from spinquant.rotation.online import OnlineHadamard  # noqa: E402
from tests.conftest import make_tiny  # noqa: E402


def _lower(module: torch.nn.Module, example: tuple, path) -> None:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    ep = torch.export.export(module.eval(), example, strict=True)
    path.write_bytes(to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch().buffer)


def _run(path, *inputs):
    from executorch.runtime import Runtime
    return Runtime.get().load_program(str(path)).load_method("forward").execute(list(inputs))[0]


@pytest.mark.parametrize("spec", [QuantSpec(bits=4, granularity="group", group_size=32, scale_dtype="bfloat16"),
                                  QuantSpec(bits=4, granularity="channel"),
                                  QuantSpec(bits=8, granularity="channel")], ids=["int4-g32-bf16", "int4-ch", "int8-ch"])
def test_xnnpack_holds_our_codes_and_scales(tmp_path, spec):
    """A one-linear program (XNNPACK delegate, our codes) fed the identity (quantized exactly by int8 asym per token)
    returns our dequantized weight to fp32 rounding: a code off by one would move an entry by a whole scale step."""
    torch.manual_seed(1)
    lin = torch.nn.Linear(96, 40, bias=False)
    lin.weight.data = torch.randn(40, 96) * torch.rand(40, 1)
    act = QuantSpec(bits=8, symmetric=False, granularity="token", dynamic=True)
    ql = QuantLinear.from_linear(lin, rtn(lin.weight.data, spec), act)
    et = ExecuTorchLinear(ql)
    eye = torch.eye(96)
    with torch.no_grad():
        assert torch.equal(et(eye), ql(eye))  # the exported graph is our fake-quant linear, bit for bit
    _lower(et, (eye,), tmp_path / "l.pte")
    got = _run(tmp_path / "l.pte", eye)
    want = ql.qweight.dequantize().T
    step = ql.qweight.scale.reshape(40, -1).min().item()
    assert (got - want).abs().max().item() < 1e-3 * step
    if spec.granularity == "group":  # XNNPACK stores group scales in bf16: ours already are, so nothing rounds
        s = ql.qweight.scale
        assert torch.equal(s.to(torch.bfloat16).float(), s.float())


def test_bf16_scale_rounding_only_where_asked():
    w = torch.randn(8, 64)
    from spinquant.quant.quantizer import compute_qparams
    s_bf, _ = compute_qparams(w, QuantSpec(bits=4, granularity="group", group_size=32, scale_dtype="bfloat16"))
    s_32, _ = compute_qparams(w, QuantSpec(bits=4, granularity="group", group_size=32))
    assert torch.equal(s_bf.to(torch.bfloat16).float(), s_bf) and not torch.equal(s_32.to(torch.bfloat16).float(), s_32)


def test_r4_uses_executorch_hadamard_op_or_our_dense_matrix():
    """A power-of-two R4 runs as llama::fast_hadamard_transform (which must compute our matrix); other sizes as a
    dense matmul by our (block-)Hadamard."""
    x = torch.randn(3, 128, dtype=torch.float32)
    fast = ExecuTorchHadamard(OnlineHadamard(128))
    assert fast.fast and torch.allclose(fast(x), OnlineHadamard(128)(x), atol=1e-5)
    odd = OnlineHadamard(172, fallback="block_diagonal")
    dense = ExecuTorchHadamard(odd)
    x = torch.randn(3, 172)
    assert not dense.fast and torch.allclose(dense(x), odd(x), atol=1e-5)


@pytest.fixture(scope="module", params=["quarot", "spinquant"])
def exported(request, tmp_path_factory):
    """A small Llama (2 layers, MLP width 128) rotated with R1/R2 + online R4 (no R3), QuaRot's Hadamards or
    SpinQuant's learned R1/R2 (a few steps against the W4A8 target), at quant=executorch_w4a8, exported once per
    rotation (an export takes ~1 min: ExecuTorch's passes, not the model size, dominate)."""
    model = make_tiny("llama", vocab=512, intermediate=128).float()
    if request.param == "quarot":
        rotation.apply(model, {"name": "quarot", "r3": False})
    else:
        calib = torch.randint(0, 512, (6, 32), generator=torch.Generator().manual_seed(0))
        rotation.apply(model, {"name": "spinquant", "r3": False, "steps": 3, "batch_size": 2, "heldout": 2,
                               "progress": False}, calib, target=QuantConfig(scheme="ExecuTorch-W4A8"))
        st = model.spinquant.rotation.stats
        assert st["losses"][0] != st["losses"][-1]  # the rotations were learned, not left at the Hadamard
    quantize_(model, QuantConfig(scheme="ExecuTorch-W4A8"), progress=False)
    ref = copy.deepcopy(model)
    path = export_executorch(model, tmp_path_factory.mktemp("et") / "m.pte", max_seq_len=96)
    return ref, path, model


def test_program_matches_our_packed_model(exported):
    """Logits of the .pte in ExecuTorch's runtime against our packed W4A8 model (kernels.pack): equal up to the
    rounding of XNNPACK's own int8 activation codes: max |Δlogit| ≤ 3% of the logit range, mean ≤ 0.3%."""
    ref, path, et_model = exported
    assert any(isinstance(m, ExecuTorchHadamard) and m.fast for m in et_model.modules())  # R4 on ExecuTorch's op
    packed = copy.deepcopy(ref)
    kernels.pack(packed, torch.float32, backend="cpu")
    ids = torch.randint(0, ref.config.vocab_size, (2, 80), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = packed(ids).logits.float()
        fq = ref(ids).logits.float()
    lm = ExecuTorchLM(path, n_threads=1)
    got = lm(ids)
    rng = (want.max() - want.min()).item()
    assert (got - want).abs().max().item() <= 0.03 * rng and (got - want).abs().mean().item() <= 0.003 * rng
    assert (got - fq).abs().max().item() <= 0.03 * rng
    # top-1 agreement and the loss of the window
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() > 0.9
    ce = torch.nn.functional.cross_entropy
    loss_got = ce(got[:, :-1].reshape(-1, got.shape[-1]), ids[:, 1:].reshape(-1))
    loss_want = ce(want[:, :-1].reshape(-1, want.shape[-1]), ids[:, 1:].reshape(-1))
    assert abs(loss_got.item() / loss_want.item() - 1) < 0.005


def test_a_program_is_recognised_as_its_own_output_and_a_foreign_file_is_kept(exported, tmp_path):
    """The writer replaces an earlier program (recognised by ExecuTorch's file identifier) and refuses, before any
    work, to replace a file that is not one."""
    from spinquant.et_export import WRITER, is_pte
    from spinquant.writes import OutputPathError, check_file
    ref, path, _ = exported
    assert is_pte(path) and check_file(path, WRITER, is_pte) == path
    notes = tmp_path / "notes.pte"
    notes.write_text("mine")
    assert not is_pte(notes)
    with pytest.raises(OutputPathError, match="not recognised as ExecuTorch"):
        export_executorch(copy.deepcopy(ref), notes, max_seq_len=16)
    assert notes.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.pte"]


def test_program_decodes_with_its_static_cache(exported):
    """Token-by-token decode through the program's static KV cache gives the logits of the one-shot prefill, and a
    new sequence from position 0 ignores what an earlier, longer one left in the cache; threads are as asked."""
    from executorch.extension.pybindings.portable_lib import _threadpool_get_thread_count
    _, path, _ = exported
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(1))
    lm = ExecuTorchLM(path, n_threads=1)
    assert _threadpool_get_thread_count() == 1
    full = lm.step(ids, 0)
    lm.step(ids[:, :24], 0)
    steps = torch.cat([lm.step(ids[:, i:i + 1], i) for i in range(24, 40)], dim=1)
    scale = full.abs().max().item()
    assert (steps - full[:, 24:]).abs().max().item() < 0.02 * scale
    short = lm.step(ids[:, :10], 0)
    assert (short - full[:, :10]).abs().max().item() < 0.02 * scale


@pytest.mark.parametrize("change, match", [
    (dict(kv=QuantSpec(bits=8, symmetric=False, granularity="token", dynamic=True)), "KV-cache"),
    (dict(weight=QuantSpec(bits=4, granularity="group", group_size=32, clip_search="mse")), "bf16"),
    (dict(weight=QuantSpec(bits=4, symmetric=False, granularity="group", group_size=32, scale_dtype="bfloat16")),
     "not an XNNPACK weight layout"),
    (dict(act=QuantSpec(bits=8, symmetric=True, granularity="token", dynamic=True)), "asym per token"),
    (dict(embed=QuantSpec(bits=4, granularity="channel")), "embedding_byte"),
])
def test_config_refusals(change, match):
    from dataclasses import replace
    with pytest.raises(ETExportError, match=match):
        check_config(replace(preset("ExecuTorch-W4A8"), **change))


def test_r3_and_lora_refused():
    from spinquant.rotation import QuaRotConfig
    with pytest.raises(ETExportError, match="R3"):
        check_config(preset("ExecuTorch-W4A8"), QuaRotConfig())
    check_config(preset("ExecuTorch-W4A8"), QuaRotConfig(r3=False))  # R1/R2/R4 is carried
    model = make_tiny("llama")
    rotation.apply(model, {"name": "quarot"})
    quantize_(model, QuantConfig(scheme="ExecuTorch-W4A8"), progress=False)
    with pytest.raises(ETExportError, match="R3"):
        to_executorch_modules(model)


def test_unwritable_path_refused_and_nothing_left(tmp_path):
    from spinquant.writes import OutputPathError
    model = make_tiny("llama")
    quantize_(model, QuantConfig(scheme="ExecuTorch-W4A8"), progress=False)
    with pytest.raises(OutputPathError, match="/proc is not writable"):  # a real probe: root passes access() checks
        export_executorch(model, "/proc/m.pte", max_seq_len=32)
    (tmp_path / "f").write_text("")
    with pytest.raises(OutputPathError, match="f is a file, not a folder"):
        export_executorch(model, tmp_path / "f" / "m.pte", max_seq_len=32)
    with pytest.raises(ETExportError, match="exceeds the model's context"):
        export_executorch(model, tmp_path / "m.pte", max_seq_len=4096)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_cli_executorch_export_refuses_from_config_before_loading(tmp_path, monkeypatch):
    from spinquant import cli, pipeline

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the refusal")
    monkeypatch.setattr(pipeline, "load", no_load)
    for overrides, match in ((["quant=w4a8"], "bf16"), (["quant=w4a4kv4"], "KV-cache"),
                             (["quant=executorch_w4a8", "rotation=spinquant"], "R3"),
                             (["quant=executorch_w4a8", "qat=full", "qat.scales=learnable"], "learnable"),
                             (["quant=executorch_w4a8", "+quant.overrides=[{modules: '*.down_proj', "
                               "weight: {scale_dtype: null}}]"], "bf16")):
        with pytest.raises(ETExportError, match=match):
            cli.main(["export", str(tmp_path / "m.pte"), "--format", "executorch", *overrides])
    assert not list(tmp_path.iterdir())
