"""Triton kernels against float64 references, under TRITON_INTERPRET=1 on the CPU (on a GPU when there is one).
Small sizes, odd shapes, random scales per group: a wrong index, nibble order or scale fails these."""
import os

import pytest
import torch

from tests.conftest import require

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
require("triton")

from spinquant.kernels import PackedLinear  # noqa: E402
from spinquant.kernels import triton_kernels as tk  # noqa: E402
from spinquant.quant import QuantLinear, QuantSpec  # noqa: E402
from spinquant.quant.rtn import rtn  # noqa: E402
from spinquant.rotation.hadamard import fwht, hadamard  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("n", [8, 64, 256, 384, 172 * 4, 172 * 64, 4096])  # 384 = 12·32; 172 = Goethals–Seidel
def test_hadamard_equals_dense(n):
    x = torch.randn(5, n, dtype=torch.float64)
    want = x @ hadamard(n) / n ** 0.5
    got = tk.hadamard(x.float().to(DEV)).cpu().double()
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert torch.allclose(got, fwht(x), atol=1e-4, rtol=1e-4)


def test_hadamard_refuses_too_large_a_base():
    with pytest.raises(ValueError, match="triton hadamard supports"):
        tk.hadamard(torch.randn(2, 172 * 3 * 128))


def _w4(N, K, group, symmetric, seed=0):
    """Random 4-bit codes, scales and (float) zeros in the export layout, with the dense float64 weight."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(0, 16, (N, K), generator=g)
    groups = 1 if group is None else K // group
    scale = torch.rand(N, groups, generator=g, dtype=torch.float64) * 0.1 + 0.01
    zero = None if symmetric else torch.randn(N, groups, generator=g, dtype=torch.float64) * 0.05
    gs = K if group is None else group
    W = (u.double() - 8) * scale.repeat_interleave(gs, 1)
    if zero is not None:
        W = W + zero.repeat_interleave(gs, 1)
    up = torch.nn.functional.pad(u, (0, K % 2), value=8).to(torch.uint8)
    q = up[:, 0::2] | (up[:, 1::2] << 4)
    return q, scale, zero, W


@pytest.mark.parametrize("M,N,K,group,symmetric", [
    (1, 32, 64, 32, True), (7, 48, 128, 64, False), (33, 40, 96, 32, True), (5, 24, 70, None, False),
    (16, 64, 256, 128, True)])
def test_w4a16_matmul_equals_dense(M, N, K, group, symmetric):
    q, scale, zero, W = _w4(N, K, group, symmetric, seed=M)
    x = torch.randn(M, K, dtype=torch.float64)
    got = tk.w4a16_matmul(x.float().to(DEV), q.to(DEV), scale.float().to(DEV),
                          None if zero is None else zero.float().to(DEV), group).cpu().double()
    assert torch.allclose(got, x @ W.T, atol=1e-4, rtol=1e-4)


def test_w4a16_matmul_runs_a_packed_linear_export():
    """The Triton kernel computes what the CPU-packed module computes, from the same exported tensors."""
    spec = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=32)
    lin = torch.nn.Linear(96, 48, bias=False)
    pl = PackedLinear.from_quant_linear(QuantLinear.from_linear(lin, rtn(lin.weight.data, spec)))
    t = pl.export_tensors()
    x = torch.randn(6, 96)
    got = tk.w4a16_matmul(x.to(DEV), t["qweight"].to(DEV), t["scale"].float().to(DEV), t["zero"].float().to(DEV), 32)
    assert torch.allclose(got.cpu(), pl.reference(x), atol=1e-4, rtol=1e-4)


def test_w4a16_matmul_rejects_bad_layout():
    with pytest.raises(ValueError, match="ceil"):
        tk.w4a16_matmul(torch.randn(2, 64), torch.zeros(8, 31, dtype=torch.uint8), torch.ones(8, 2), None, 32)


@pytest.mark.parametrize("M,N,K,with_zero", [(1, 32, 64, True), (9, 40, 100, True), (33, 16, 48, False)])
def test_int8_matmul_equals_integer_reference(M, N, K, with_zero):
    xq = torch.randint(-128, 128, (M, K), dtype=torch.int8)
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    sx, sw = torch.rand(M) + 0.1, torch.rand(N) + 0.1
    zx = torch.randint(-20, 20, (M,)) if with_zero else None
    acc = (xq.double() - (zx.double()[:, None] if with_zero else 0)) @ w.double().T
    want = acc * sx.double()[:, None] * sw.double()[None, :]
    got = tk.int8_matmul(xq.to(DEV), w.to(DEV), sx.to(DEV), sw.to(DEV), None if zx is None else zx.to(DEV)).cpu()
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("scheme,group", [("W4A16", 32), ("W4A16", None), ("W4A8", 32), ("W4A8", 64), ("W8A8", None)])
def test_packed_linear_on_triton_equals_the_cpu_packed_and_fake_quant_paths(scheme, group):
    """pack(backend="triton") runs the Triton kernels inside PackedLinear (here under the interpreter): output
    equals the fake-quant QuantLinear and the CPU-packed module, odd widths included; the saved form is the
    CPU kernel's, so a Triton-packed layer exports the same tensors."""
    from spinquant.kernels import PackedLinear
    from spinquant.quant import QuantConfig, QuantLinear, get_weight_quantizer
    torch.manual_seed(len(scheme) * 7 + (group or 0))
    over = {} if group is None else {"weight": {"granularity": "group", "group_size": group}}
    if group is None and scheme.startswith("W4"):
        over = {"weight": {"granularity": "channel"}}
    cfg = QuantConfig.from_dict({"scheme": scheme, **over})
    K = 96 if group != 64 else 128
    lin = torch.nn.Linear(K, 40, bias=True)
    qw = get_weight_quantizer("rtn").fn(lin.weight.data, cfg.weight_spec_for(K))
    ql = QuantLinear.from_linear(lin, qw)
    ql.act_spec = cfg.act if cfg.act.enabled else None
    tri = PackedLinear.from_quant_linear(ql, backend="triton")
    assert tri.kernel == ("triton_int8" if scheme == "W8A8" else "triton_int4")
    cpu_m = PackedLinear.from_quant_linear(ql)
    x = torch.randn(5, K)
    with torch.no_grad():
        ref, got, on_cpu = ql(x), tri(x), cpu_m(x)
    assert torch.allclose(got, tri.reference(x), atol=1e-4, rtol=1e-4)
    assert torch.allclose(got, ref, atol=1e-2 * ref.abs().max(), rtol=0)  # scales are stored in bf16
    assert torch.allclose(got, on_cpu, atol=2e-2 * ref.abs().max(), rtol=0)  # torch's CPU ops compute in bf16
    a, b = tri.export_tensors(), cpu_m.export_tensors()
    assert tri.portable_kernel == cpu_m.portable_kernel and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_whole_model_packed_for_triton_matches_cpu_packing_and_saves_the_same_checkpoint(tmp_path):
    import copy

    from conftest import make_tiny

    from spinquant import export, kernels
    from spinquant.quant import QuantConfig, quantize_
    model = make_tiny("llama", hidden=64, intermediate=128)
    quantize_(model, QuantConfig.from_dict({"scheme": "W4A8"}), progress=False)
    on_cpu, on_triton = copy.deepcopy(model), copy.deepcopy(model)
    kernels.pack(on_cpu)
    kernels.pack(on_triton, backend="triton")
    assert kernels.kernel_summary(on_triton) == {"triton_int4": 14}
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        ref, got = model(ids).logits.float(), on_triton(ids).logits.float()
    assert torch.allclose(got, ref, atol=2e-2 * ref.abs().max(), rtol=0)
    a, b = export.save(on_triton, tmp_path / "t"), export.save(on_cpu, tmp_path / "c")
    from safetensors.torch import load_file  # same tensors (the header's metadata order is not deterministic)
    ta, tb = load_file(a / export.WEIGHTS), load_file(b / export.WEIGHTS)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert (a / "spinquant.json").read_text() == (b / "spinquant.json").read_text()
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        kernels.pack(copy.deepcopy(model), backend="cuda")


def test_run_py_evaluates_the_triton_packed_model(tmp_path):
    """kernels=triton in an experiment: the packed model's perplexity sits next to the fake-quant one."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    root = Path(__file__).resolve().parents[1]
    from spinquant import cli as run_mod
    with initialize_config_dir(config_dir=str(root / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=["model=stories260k", "quant=w4a16", f"results_dir={tmp_path}", "progress=false",
                                           "experiment_name=tri", "wandb.mode=disabled", "eval.datasets=[wikitext2]",
                                           "eval.max_windows=2", "eval.seq_len=64", "eval.size=false", "kernels=triton"])
    row = run_mod.run_hydra(cfg)
    packed = row["metrics"]["packed"]
    assert packed["kernels"] == {"triton_int4": 35}
    assert packed["ppl"]["wikitext2"] == pytest.approx(row["metrics"]["ppl"]["wikitext2"], rel=2e-2)
