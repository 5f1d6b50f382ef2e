"""spinquant's C kernels (kernels/native.py): fused activation quantization + integer GEMM on tiled weights.

Both builds are checked: the machine's vector path (AVX-512 VNNI where the CPU has it) and the portable C
loops (-DSQ_NO_SIMD), against float64 dense references on fresh random inputs and odd shapes."""
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from spinquant.kernels import PackedLinear, choose_kernel, native
from spinquant.kernels.linear import token_codes
from spinquant.quant import QuantLinear, QuantSpec
from spinquant.quant.rtn import rtn
from spinquant.rotation.online import OnlineHadamard
from tests.conftest import skip_outside_ci


@pytest.fixture(autouse=True)
def _needs_the_build():
    """The machine's own build (the vector path its CPU has; CI's has AVX-512 VNNI): skipped on a developer machine
    without a working C compiler, a failure under CI."""
    if not native.builds():
        skip_outside_ci("no working C compiler: spinquant's native kernels are not built")


A8 = QuantSpec(bits=8, symmetric=False, granularity="token", dynamic=True)
A8S = QuantSpec(bits=8, symmetric=True, granularity="token", dynamic=True)
A8C = QuantSpec(bits=8, symmetric=False, granularity="token", dynamic=True, clip_ratio=0.9)
A4 = QuantSpec(bits=4, symmetric=False, granularity="token", dynamic=True, clip_ratio=0.9)
A4S = QuantSpec(bits=4, symmetric=True, granularity="token", dynamic=True)
LIBS = {"simd": (), "portable": ("-DSQ_NO_SIMD",)}
if "avx2" in native._cpu_id().split() and "avx512f" in native._cpu_id().split():
    LIBS["avx2"] = ("-mno-avx512f",)  # the AVX2 path (x86 without AVX-512), built and run natively on this CPU


def _lib(name):
    return native.load(LIBS[name])


def _x(m, k, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 2
    x[:, 3 % k] *= 30  # an outlier channel
    if m > 2:
        x[1] = 0  # an all-zero token: scale falls back to 1
        x[2] = x[2].abs()  # a token with no negative value: zero point at qmin
    return x.to(dtype)


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("spec", [A8, A8S, A8C, A4, A4S])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_codes_are_bit_identical_to_token_codes(lib, spec, dtype):
    x = _x(6, 203, seed=spec.bits + int(spec.symmetric), dtype=dtype)
    v, z, s = token_codes(x, spec)
    c, scale, zp = native.quant_act(x, spec, k_pad=208, lib=_lib(lib))
    shift = -128 - spec.qmin
    assert torch.equal(c[:, :203].to(torch.int32), (v + shift).to(torch.int32))
    assert torch.equal(scale, s[:, 0]) and torch.equal(zp, (z[:, 0] + shift).to(torch.int32))
    assert (c[:, 203:].to(torch.int32) == zp[:, None]).all()  # padding holds the code of 0.0


def _quant_linear(n_out, n_in, w_spec, a_spec, seed):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(n_in, n_out, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n_out, n_in, generator=g) * 0.05)
    return QuantLinear.from_linear(lin, rtn(lin.weight.data, w_spec), a_spec)


W4 = [QuantSpec(bits=4, granularity="group", group_size=32),
      QuantSpec(bits=4, symmetric=False, granularity="group", group_size=64),
      QuantSpec(bits=3, granularity="group", group_size=16),  # a group torch's int4 op does not take
      QuantSpec(bits=4, granularity="channel"),
      QuantSpec(bits=2, symmetric=False, granularity="channel")]
W8 = [QuantSpec(bits=8, granularity="channel"), QuantSpec(bits=6, granularity="channel")]
SHAPES = [(48, 128), (100, 96), (40, 172), (33, 200)]  # out not a multiple of 16, in not of 8 (channel only)


def _case(w_spec, shape):
    n_out, n_in = shape
    return w_spec.granularity == "channel" or n_in % w_spec.group_size == 0


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("w_spec", W4 + W8, ids=lambda s: s.short())
@pytest.mark.parametrize("a_spec", [A8, A8S, A4], ids=lambda s: s.short())
def test_native_linear_matches_float64_reference(lib, w_spec, a_spec):
    """Exact integer sums + float32 group scaling: within 1e-5 of the float64 product of the same dequantized
    weight and quantized activations, for 1..9 tokens (register blocks of 4 and their remainders) and for 37
    (the int4 prefill kernel's 16-token lane blocks, the last one partial)."""
    kernel = "cpu_w4a8" if w_spec.bits <= 4 else "cpu_w8a8"
    for i, shape in enumerate(s for s in SHAPES if _case(w_spec, s)):
        ql = _quant_linear(*shape, w_spec, a_spec, seed=i)
        pl = PackedLinear.from_quant_linear(ql, kernel)
        W = pl.dequantized_weight().double()
        # the tiles dequantize to the fake-quant weight up to the bf16 rounding of the scales
        assert (W - ql.qweight.dequantize(torch.float32).double()).abs().max() < 1e-2 * W.abs().max()
        for m in (1, 3, 4, 9, 37):
            x = _x(m, shape[1], seed=m)
            v, z, s = token_codes(x, a_spec)
            want = ((v - z) * s).double() @ W.t()
            if kernel == "cpu_w4a8":
                got = native.w4a8_linear(x, a_spec, pl.tiles, pl.tile_scales, pl.tile_zeros, pl.rsum, shape[0],
                                         pl.group, torch.float32, lib=_lib(lib))
            else:
                got = native.w8a8_linear(x, a_spec, pl.w_int8, pl.w_scale, pl.colsum, torch.float32, lib=_lib(lib))
            err = ((got.double() - want).abs().max() / want.abs().max()).item()
            assert got.shape == (m, shape[0]) and err < 1e-5, (shape, m, err)


def test_vector_and_portable_builds_agree_and_bf16_output_rounds_to_nearest():
    ql = _quant_linear(80, 256, W4[1], A8, seed=3)
    pl = PackedLinear.from_quant_linear(ql, "cpu_w4a8")
    x = _x(7, 256, seed=5, dtype=torch.bfloat16)
    args = (x, A8, pl.tiles, pl.tile_scales, pl.tile_zeros, pl.rsum, 80, pl.group)
    f32 = {n: native.w4a8_linear(*args, torch.float32, lib=_lib(n)) for n in LIBS}
    b16 = {n: native.w4a8_linear(*args, torch.bfloat16, lib=_lib(n)) for n in LIBS}
    assert torch.allclose(f32["simd"], f32["portable"], rtol=1e-5, atol=1e-5 * f32["simd"].abs().max().item())
    for n in LIBS:
        assert torch.equal(b16[n], f32[n].to(torch.bfloat16))
    assert pl(x).dtype == torch.bfloat16


@pytest.mark.parametrize("w_spec,a_spec", [(W4[0], A8), (W4[1], A8), (W4[3], A4), (W8[0], A8S)],
                         ids=["w4g32", "w4g64a", "w4ch", "w8"])
def test_native_module_saves_the_portable_form_and_reloads(w_spec, a_spec):
    """A native module writes the same tensors as torch's int4 / int8 kernel module (the saved format does not
    depend on the kernel), and rebuilding it from them gives the same outputs bit for bit."""
    ql = _quant_linear(40, 172 if w_spec.granularity == "channel" else 128, w_spec, a_spec, seed=1)
    nat = PackedLinear.from_quant_linear(ql, "cpu_w4a8" if w_spec.bits <= 4 else "cpu_w8a8")
    torch_op = PackedLinear.from_quant_linear(ql, kernel=choose_kernel(w_spec))
    a, b = nat.export_tensors(), torch_op.export_tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    back = PackedLinear.from_export(a, ql.in_features, 40, w_spec, a_spec, nat.kernel)
    x = _x(5, ql.in_features, seed=2)
    with torch.no_grad():
        assert torch.equal(back(x), nat(x))
        assert ((nat(x) - torch_op(x)).norm() / torch_op(x).norm()) < 1e-2  # torch's op: bf16 activations


def test_int8_prefill_on_int_mm_equals_the_native_kernel_bit_for_bit():
    """cpu_w8a8 hands >= NATIVE_MAX_TOKENS tokens to torch._int_mm with the native kernel's codes: the same exact int32
    sums and the same float operations, so a token's output does not depend on how many tokens came with it."""
    from spinquant.kernels.layouts.native_w8a8 import NATIVE_MAX_TOKENS
    ql = _quant_linear(40, 172, W8[0], A8, seed=4)
    pl = PackedLinear.from_quant_linear(ql, "cpu_w8a8")
    m = NATIVE_MAX_TOKENS + 3
    x = _x(m, 172, seed=6, dtype=torch.bfloat16)
    with torch.no_grad():
        together = pl(x)
        alone = torch.cat([pl(x[i:i + 1]) for i in range(m)])
    assert torch.equal(together, alone)


@pytest.mark.parametrize("mode,simd,expected", [("0", 1, "int4"), ("1", 0, "cpu_w4a8"), ("auto", 1, "cpu_w4a8"),
                                                ("auto", 0, "int4")])
def test_kernel_choice_follows_spinquant_native(monkeypatch, mode, simd, expected):
    """auto: the native kernels only where their vector path is built (the portable loops lose to torch's ops)."""
    class Lib:
        def sq_simd(self):
            return simd
    monkeypatch.setenv("SPINQUANT_NATIVE", mode)
    monkeypatch.setattr(native, "load", lambda *a: Lib())
    assert choose_kernel(W4[0], A8) == expected and choose_kernel(W4[0], None) == "int4"
    assert native.plain_kernels() == (mode != "0")  # the one switch, read in one place, for every native kernel
    monkeypatch.setenv("SPINQUANT_NATIVE", "sometimes")
    with pytest.raises(ValueError, match="SPINQUANT_NATIVE must be"):
        native.available()


def test_avx2_builds_take_the_native_kernels(monkeypatch):
    """On an AVX2-only CPU (vector path 2) the native W4A8 and W8A8 kernels are chosen (measured against torch's ops
    capped at AVX2: the int8 one-token GEMV 2.2x, the int4 one beyond torch's int4 op), as on AVX-512."""
    from spinquant.kernels import linear
    monkeypatch.setattr(native, "available", lambda: True)
    monkeypatch.delenv("SPINQUANT_NATIVE", raising=False)
    for simd in (2, 1):
        monkeypatch.setattr(native, "simd", lambda: simd)
        assert linear.choose_kernel(W4[0], A8) == "cpu_w4a8" and linear.choose_kernel(W8[0], A8) == "cpu_w8a8"


def test_a_failing_compiler_gives_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "false")
    with pytest.raises(native.NativeBuildError, match="compiling lowbit.c with false failed"):
        native.build(cache=tmp_path)


def test_int4_layout_inverts():
    u = torch.randint(0, 16, (32, 48), dtype=torch.uint8)
    assert torch.equal(native.untile_int4(native.tile_int4(u)), u)
    g = torch.randint(0, 100, (32, 3))
    assert torch.equal(native.tile_groups(g)[1, 2], g[16:, 2])


@pytest.mark.parametrize("lib", LIBS)
def test_bad_calls_are_clear_errors_not_crashes(lib):
    """Checked in Python before the C call (the message names the argument), and refused again in C (a status, not
    an out-of-bounds write) when the Python side is bypassed."""
    ql = _quant_linear(48, 64, W4[1], A8, seed=0)
    pl = PackedLinear.from_quant_linear(ql, "cpu_w4a8")
    args = (A8, pl.tiles, pl.tile_scales, pl.tile_zeros, pl.rsum, 48, pl.group, torch.float32)
    kp = pl.tiles.shape[1] * 8
    with pytest.raises(ValueError, match="wider than the packed weight's padded width"):
        native.w4a8_linear(torch.randn(2, kp + 8), *args, lib=_lib(lib))
    with pytest.raises(ValueError, match="tiles must be torch.uint8"):
        native.w4a8_linear(torch.randn(2, 64), A8, pl.tiles.view(torch.int8), *args[2:], lib=_lib(lib))
    with pytest.raises(ValueError, match="scales must be torch.bfloat16"):
        native.w4a8_linear(torch.randn(2, 64), A8, pl.tiles, pl.tile_scales.float(), *args[3:], lib=_lib(lib))
    with pytest.raises(ValueError, match="activations"):
        native.w4a8_linear(torch.randint(0, 3, (2, 64)), *args, lib=_lib(lib))
    with pytest.raises(ValueError, match="padded width"):
        native.quant_act(torch.randn(2, 70), A8, k_pad=64, lib=_lib(lib))
    ql8 = _quant_linear(16, 64, QuantSpec(bits=8, granularity="channel"), A8, seed=0)
    p8 = PackedLinear.from_quant_linear(ql8, "cpu_w8a8")
    with pytest.raises(ValueError, match="rsum must be torch.int32"):
        native.w8a8_linear(torch.randn(2, 64), A8, p8.w_int8, p8.w_scale, p8.colsum.float(), torch.float32,
                           lib=_lib(lib))
    k = native.W8A8_MAX_K + 1  # int32 sums would no longer be exact
    with pytest.raises(ValueError, match="exceeds 65793"):
        native.w8a8_linear(torch.randn(1, k), A8, torch.zeros(2, k, dtype=torch.int8), torch.ones(2),
                           torch.zeros(2, dtype=torch.int32), torch.float32, lib=_lib(lib))
    # bypassing the Python checks: C answers with a status instead of writing past its buffers
    x = torch.randn(2, kp + 64)
    y = torch.empty(2, 48)
    rc = _lib(lib).sq_w4a8_linear(x.data_ptr(), 0, 2, kp + 64, *native._act_args(A8, kp + 64), pl.tiles.data_ptr(),
                                  pl.tile_scales.data_ptr(), None, pl.rsum.data_ptr(), 48, kp, pl.group, y.data_ptr(), 0)
    assert rc == -1
    rc = _lib(lib).sq_w8a8_linear(x.data_ptr(), 0, 1, k, *native._act_args(A8, k), x.data_ptr(), k, x.data_ptr(),
                                  x.data_ptr(), 1, y.data_ptr(), 0)
    assert rc == -1



def test_each_build_runs_the_vector_path_it_claims():
    """The machine's build takes the best path its CPU flags allow (AVX-512 VNNI 1, AVX2 2, ARM sdot 3, else 0)."""
    flags = set(native._cpu_id().split())
    best = 1 if {"avx512f", "avx512bw", "avx512_vnni"} <= flags else 2 if {"avx2", "fma"} <= flags else \
        3 if "asimddp" in flags else 0
    want = {"simd": best, "portable": 0, "avx2": 2}
    assert {name: _lib(name).sq_simd() for name in LIBS} == {name: want[name] for name in LIBS}


def test_kernels_follow_torch_set_num_threads():
    """The kernels' OpenMP regions use torch's runtime: torch.set_num_threads sets their thread count."""
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert native.omp_threads() == n
    finally:
        torch.set_num_threads(before)


def _counting_run(monkeypatch):
    calls = []
    real = subprocess.run

    def run(cmd, *a, **kw):
        if "--version" not in cmd:
            calls.append(cmd)
        return real(cmd, *a, **kw)
    monkeypatch.setattr(native.subprocess, "run", run)
    return calls


def test_a_failed_build_warns_once_and_is_not_retried(monkeypatch, tmp_path):
    """gcc failing: one warning, then every later query (available, builds, plain_kernels: asked per forward by the
    FWHT and attention kernels) answers from memory, without another compiler run."""
    monkeypatch.setattr(native, "_LOADED", {})
    monkeypatch.setattr(native, "_FAILED", {})
    monkeypatch.setattr(native, "cache_root", lambda: tmp_path)
    monkeypatch.setenv("CC", "false")
    monkeypatch.delenv("SPINQUANT_NATIVE", raising=False)
    monkeypatch.delenv("SPINQUANT_NATIVE_FLAGS", raising=False)
    calls = _counting_run(monkeypatch)
    with pytest.warns(UserWarning, match="unavailable, using torch's ops") as seen:
        for _ in range(3):
            assert not native.available() and not native.builds() and not native.plain_kernels()
        with pytest.raises(native.NativeBuildError):
            native.load()
    assert len(seen) == 1 and len(calls) == 2  # one OpenMP attempt, one without, once


def test_a_compiler_without_openmp_builds_under_its_own_key(monkeypatch, tmp_path):
    """A compiler that fails with -fopenmp gives single-threaded kernels (with a warning) under their own cache key,
    remembered so the OpenMP attempt is not repeated; an OpenMP-capable compiler later gets its own build, not those;
    a different compiler version is a different build."""
    cc = tmp_path / "cc-no-omp"
    cc.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec gcc "$@"\n')
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    calls = _counting_run(monkeypatch)
    with pytest.warns(UserWarning, match="single-threaded"):
        plain = native.build(cache=tmp_path)
    assert len(calls) == 2 and plain.exists()
    assert native.build(cache=tmp_path) == plain and len(calls) == 2  # from the cache: no compiler run
    monkeypatch.setenv("CC", "gcc")
    with_omp = native.build(cache=tmp_path)
    assert with_omp != plain and len(calls) == 3
    monkeypatch.setattr(native, "_compiler_version", lambda cc: "gcc (a newer one) 99.0")
    assert native.build(cache=tmp_path) not in (with_omp, plain)


# ---- ARM builds, cross-compiled and run under qemu-user -------------------------------------------------------

ARM_CC, QEMU = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
DRIVER = Path(__file__).with_name("native") / "driver.c"


@pytest.fixture(scope="module")
def arm_drivers(tmp_path_factory):
    """The kernels + tests/native/driver.c for aarch64: with sdot (ARMv8.2 dotprod) and the portable loops."""
    if not (ARM_CC and QEMU):
        if os.environ.get("CI") == "true":
            pytest.fail("CI installs gcc-aarch64-linux-gnu and qemu-user (.ci/run): the ARM kernels must be tested")
        skip_outside_ci("no aarch64 cross compiler / qemu-user (apt-get install gcc-aarch64-linux-gnu qemu-user)")
    d = tmp_path_factory.mktemp("arm")
    out = {}
    for name, march in (("sdot", "armv8.2-a+dotprod"), ("portable", "armv8-a")):
        exe = d / f"driver-{name}"
        r = subprocess.run([ARM_CC, "-O2", f"-march={march}", "-std=c11", "-static", str(native.SOURCE), str(DRIVER),
                            "-o", str(exe), "-lm"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        out[name] = exe
    return out


def _arm(exe, op: str, payload: bytes, tmp: Path) -> bytes:
    (tmp / "in.bin").write_bytes(payload)
    r = subprocess.run([QEMU, str(exe), op, str(tmp / "in.bin"), str(tmp / "out.bin")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return (tmp / "out.bin").read_bytes()


def _b(*arrays) -> bytes:
    return b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)


def _act_header(spec, k: int, hadamard: bool = False) -> bytes:
    qmin, qmax, clip, sym, shift, had = native._act_args(spec, k, hadamard)
    return _b(np.array([qmin, qmax, clip], np.float32), np.array([sym, shift], np.int32), np.array([had], np.float32))


@pytest.mark.parametrize("build", ["sdot", "portable"])
def test_arm_builds_match_the_float64_reference(arm_drivers, tmp_path, build):
    """The ARM kernels (sdot, and the portable loops on ARM) against the same float64 references as the host
    build: bit-identical activation codes, linears within 1e-5, for int4 groups / channels and int8 weights."""
    exe = arm_drivers[build]
    simd = subprocess.run([QEMU, str(exe), "simd"], capture_output=True, text=True).stdout.strip()
    assert simd == {"sdot": "3", "portable": "0"}[build]
    x = _x(5, 203, seed=1)
    for spec in (A8, A4S):
        raw = _arm(exe, "quant_act", _b(np.array([5, 203, 208], np.int32)) + _act_header(spec, 203) + _b(x.numpy()),
                   tmp_path)
        rc, c = np.frombuffer(raw[:4], np.int32)[0], np.frombuffer(raw[4:4 + 5 * 208], np.int8)
        v, z, s = token_codes(x, spec)
        assert rc == 0 and np.array_equal(c.reshape(5, 208)[:, :203].astype(np.int32),
                                          (v + (-128 - spec.qmin)).to(torch.int32).numpy())
    x = _x(5, 128, seed=2)  # the fused R4: codes of x·H / sqrt(128), as the module rotates in float32
    raw = _arm(exe, "quant_act", _b(np.array([5, 128, 128], np.int32)) + _act_header(A8, 128, hadamard=True)
               + _b(x.numpy()), tmp_path)
    v, z, s = token_codes(OnlineHadamard(128)(x), A8)
    assert np.array_equal(np.frombuffer(raw[4:4 + 5 * 128], np.int8).reshape(5, 128).astype(np.int32),
                          (v + (-128 - A8.qmin)).to(torch.int32).numpy())
    for w_spec, kernel in ((W4[0], "cpu_w4a8"), (W4[1], "cpu_w4a8"), (W4[3], "cpu_w4a8"), (W8[0], "cpu_w8a8")):
        for i, shape in enumerate(s for s in SHAPES if _case(w_spec, s)):
            ql = _quant_linear(*shape, w_spec, A8, seed=i)
            pl = PackedLinear.from_quant_linear(ql, kernel)
            W = pl.dequantized_weight().double()
            for m in (1, 4, 9):
                x = _x(m, shape[1], seed=m)
                v, z, s = token_codes(x, A8)
                want = ((v - z) * s).double() @ W.t()
                if kernel == "cpu_w4a8":
                    kp = pl.tiles.shape[1] * 8
                    head = np.array([m, shape[1], shape[0], kp, pl.group, int(pl.tile_zeros is not None)], np.int32)
                    arrays = [x.numpy(), pl.tiles.numpy(), pl.tile_scales.view(torch.int16).numpy()]
                    arrays += [] if pl.tile_zeros is None else [pl.tile_zeros.view(torch.int16).numpy()]
                    payload = _b(head) + _act_header(A8, shape[1]) + _b(*arrays, pl.rsum.numpy())
                else:
                    head = np.array([m, shape[1], shape[0], pl.w_int8.shape[1]], np.int32)
                    payload = _b(head) + _act_header(A8, shape[1]) + _b(x.numpy(), pl.w_int8.numpy(),
                                                                        pl.w_scale.numpy(), pl.colsum.numpy())
                raw = _arm(exe, kernel[4:], payload, tmp_path)
                got = torch.from_numpy(np.frombuffer(raw[4:], np.float32).reshape(m, shape[0]).copy()).double()
                err = ((got - want).abs().max() / want.abs().max()).item()
                assert np.frombuffer(raw[:4], np.int32)[0] == 0 and err < 1e-5, (build, w_spec, shape, m, err)


def _attention_case(g, d, length, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    H, L = 3, length + 5
    q = torch.randn(H, g, d, generator=gen)
    k = torch.randn(H, L, d, generator=gen).to(dtype)
    v = torch.randn(H, L, d, generator=gen).to(dtype)
    p = torch.softmax(q.double() @ k[:, :length].double().transpose(1, 2) * d ** -0.5, -1)
    return q, k, v, p, p @ v[:, :length].double()


ATTN_CASES = [(4, 64, 37, torch.bfloat16), (3, 24, 16, torch.float32), (8, 8, 5, torch.bfloat16)]


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("g,d,length,dtype", ATTN_CASES)
def test_one_token_attention_on_every_build_matches_float64(lib, g, d, length, dtype):
    q, k, v, _, want = _attention_case(g, d, length, dtype, seed=g * d)
    got = native.attend_one_token(q, k.transpose(1, 2).contiguous(), v, length, d ** -0.5, lib=_lib(lib))
    assert (got.double() - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("build", ["sdot", "portable"])
def test_arm_builds_attend_like_float64(arm_drivers, tmp_path, build):
    """The one-token attention kernels on ARM (scores, then the weighted sum of given probabilities)."""
    exe = arm_drivers[build]
    for g, d, length, dtype in ATTN_CASES:
        q, k, v, p, want = _attention_case(g, d, length, dtype, seed=g * d)
        H, L = k.shape[:2]
        bf16 = int(dtype == torch.bfloat16)

        def kv(t):
            return (t.view(torch.int16) if bf16 else t).numpy()
        head = _b(np.array([H, g, d, length, L, bf16], np.int32))
        raw = _arm(exe, "attn_scores", head + _b(np.array([d ** -0.5], np.float32), q.numpy(),
                                                   kv(k.transpose(1, 2).contiguous())), tmp_path)
        s = np.frombuffer(raw[4:], np.float32).reshape(H, g, length)
        ref = (q.double() @ k[:, :length].double().transpose(1, 2) * d ** -0.5).numpy()
        assert np.frombuffer(raw[:4], np.int32)[0] == 0 and np.abs(s - ref).max() < 1e-4
        raw = _arm(exe, "attn_mix", head + _b(p.float().numpy(), kv(v)), tmp_path)
        o = np.frombuffer(raw[4:], np.float32).reshape(H, g, d)
        assert np.frombuffer(raw[:4], np.int32)[0] == 0 and np.abs(o - want.numpy()).max() < 1e-5, (build, g, d)


@pytest.mark.parametrize("lib", LIBS)
def test_native_fwht_is_the_module_bit_for_bit_in_float32(lib):
    """native.fwht runs rotation.hadamard.fwht's butterflies in the same order: bit-identical on float32 input, one
    rounding instead of one per stage on bf16 input; a width that is not a power of two is refused."""
    from spinquant.rotation.hadamard import fwht
    for n in (1, 2, 16, 256, 8192):
        x = torch.randn(5, n)
        assert torch.equal(native.fwht(x, lib=_lib(lib)), fwht(x))
        assert (native.fwht(x.bfloat16(), lib=_lib(lib)) - fwht(x.bfloat16().double()).float()).abs().max() < 1e-5
    with pytest.raises(ValueError, match="power-of-two"):
        native.fwht(torch.randn(2, 172))


@pytest.mark.parametrize("kernel,w_spec", [("cpu_w4a8", W4[0]), ("cpu_w8a8", W8[0])])
def test_packed_r4_is_fused_into_the_kernel_and_keeps_the_modules_function(kernel, w_spec):
    """A native packed linear with an online R4 rotates inside its kernel call (no native.fwht call, no rotated
    copy): bit-identical to native.fwht then the kernel, and on float32 input to the module path, for decode, the
    int4 prefill kernel and int8's torch GEMM; with an adapter (which needs the rotated input too) the R4 is one
    native.fwht call first."""
    from unittest import mock
    ql = QuantLinear.from_linear(nn.Linear(256, 48, bias=False), rtn(torch.randn(48, 256), w_spec), A8)
    ql.input_transform = OnlineHadamard(256)
    pl = PackedLinear.from_quant_linear(ql, kernel)
    pl_ref = PackedLinear.from_quant_linear(ql, kernel)
    for m, dtype in ((1, torch.float32), (3, torch.bfloat16), (50, torch.float32), (50, torch.bfloat16)):
        x = _x(m, 256, seed=m, dtype=dtype)
        with mock.patch.object(native, "fwht", wraps=native.fwht) as spy:
            y = pl(x)
        assert spy.call_count == 0 and y.dtype == dtype
        assert torch.equal(y, pl.matmul(native.fwht(x), dtype).to(dtype))  # (int8 prefill returns float32)
        if dtype == torch.float32:
            with mock.patch.object(native, "plain_kernels", return_value=False):
                assert torch.equal(y, pl_ref(x))
    pl.adapter = nn.Linear(256, 48, bias=False)
    with mock.patch.object(native, "fwht", wraps=native.fwht) as spy:
        pl(torch.randn(3, 256))
    assert spy.call_count == 1


def test_native_int4_layout_builds_in_row_blocks_like_one_block():
    """load_tensors tiles a tall matrix in blocks of 4096 rows (a 128K-row lm_head never unpacked whole): 4096 + 40
    rows, the last block partial and padded, give the dequantized weight and the outputs of the fake-quant linear."""
    ql = QuantLinear.from_linear(nn.Linear(64, 4136, bias=False), rtn(torch.randn(4136, 64), W4[0]), A8)
    pl = PackedLinear.from_quant_linear(ql, "cpu_w4a8")
    qw = ql.qweight  # the packed form keeps scales in bf16: codes · bf16(scale), exactly
    want = (qw.codes.float().view(4136, 2, 32) * qw.scale.reshape(4136, 2, 1).bfloat16().float()).reshape(4136, 64)
    assert torch.equal(pl.dequantized_weight(), want)
    x = torch.randn(3, 64)
    assert (pl(x) - pl.reference(x)).abs().max() < 1e-4 * pl.reference(x).abs().max()
    assert torch.equal(native.untile_int4(pl.tiles)[:4136, :64].to(torch.int32) - 8,
                       native.untile_int4(PackedLinear.from_export(pl.export_tensors(), 64, 4136, pl.w_spec, A8,
                                                                   "cpu_w4a8").tiles)[:4136, :64].to(torch.int32) - 8)
