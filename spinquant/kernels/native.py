"""spinquant's own CPU kernels (csrc/lowbit.c): int4 / int8 weights x int8 per-token activations.

The C source is compiled on first use with the system C compiler (`$CC`, else gcc / cc) for this machine
(`-O3 -march=native -fopenmp`) into a cache folder (`$SPINQUANT_CACHE`, else ~/.cache/spinquant) keyed by
the source, the flags and the CPU, and loaded with ctypes; OpenMP resolves to the runtime torch already
loaded, so the kernels share torch's threads and `torch.set_num_threads`. The vector path is chosen at build
time from the CPU's own features (`-march=native`): AVX-512 VNNI, else AVX2 (x86 laptops), else portable C loops.
The CPU backend uses the kernels where a vector path is built (W4A8 and W8A8, on AVX2 as on AVX-512); the
portable loops are slower than torch's ops (measured 1.3x slower on W4A8 decode here), so there `available()` is
False unless `SPINQUANT_NATIVE=1`; `SPINQUANT_NATIVE=0` always turns them off, and a failed build falls back to
torch's ops with a warning. ARMv8.2+ builds the sdot path (see the C file).

int4 weights are tiled (`tile_int4`, undone by `untile_int4`): rows in tiles of 16, four consecutive k per
int32 lane, so one AVX-512 VNNI instruction multiplies 16 rows x 4 k (see the C file); int8 weights stay
row-major [N, K], the layout of torch's int8 op and of a tied embedding table.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from ..models.load import cache_root
from ..quant.spec import QuantSpec
from .cpu import pack_nibbles_raw, unpack_nibbles_raw

SOURCE = Path(__file__).with_name("csrc") / "lowbit.c"
TILE = 16  # rows per tile (the int32 lanes of a 512-bit register)
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-std=c11")


class NativeBuildError(RuntimeError):
    """The C kernels could not be compiled (the message has the compiler's output)."""


def _cpu_id() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    for c in (os.environ.get("CC"), "gcc", "cc"):
        if c and shutil.which(c):
            return c
    return None


@functools.lru_cache(maxsize=None)
def _compiler_version(cc: str) -> str:
    """The first line of `cc --version` (part of the build key: an upgraded compiler rebuilds)."""
    try:
        r = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
        out = (r.stdout or r.stderr).splitlines()
        return out[0] if out else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def build(extra_flags: tuple[str, ...] = (), cache: str | os.PathLike | None = None) -> Path:
    """Compile csrc/lowbit.c (cached) and return the shared library's path; `extra_flags` e.g.
    ("-DSQ_NO_SIMD",) builds the portable C loops (what the tests compare the vector path with).

    The cache key covers the source, the compiler and its version, every flag and the CPU. A compiler without
    OpenMP gives single-threaded kernels, cached under their own key (with a warning), never under the OpenMP
    build's; the failed OpenMP attempt is remembered beside them so it is not retried on every start."""
    cc = _compiler()
    if cc is None:
        raise NativeBuildError("no C compiler found (set $CC, or install gcc)")
    src = SOURCE.read_text()
    root = (Path(cache) if cache else cache_root()) / "kernels"

    def lib_for(omp):
        key = "\0".join([src, cc, _compiler_version(cc), *FLAGS, *omp, *extra_flags, _cpu_id()])
        return root / f"lowbit-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"

    with_omp, plain = lib_for(("-fopenmp",)), lib_for(())
    if with_omp.exists():
        return with_omp
    no_omp = with_omp.with_suffix(".no-openmp")  # this compiler has been seen to fail with -fopenmp
    if plain.exists() and no_omp.exists():
        _warn_single_threaded(cc)
        return plain
    root.mkdir(parents=True, exist_ok=True)
    errors = []
    for omp, lib in ((("-fopenmp",), with_omp), ((), plain)):
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            out = Path(tmp) / lib.name
            r = subprocess.run([cc, *FLAGS, *omp, *extra_flags, str(SOURCE), "-o", str(out), "-lm"],
                               capture_output=True, text=True)
            if r.returncode == 0:
                os.replace(out, lib)  # atomic: concurrent builders each write a whole file
                if not omp:
                    no_omp.write_text(errors[0] + "\n")
                    _warn_single_threaded(cc)
                return lib
            errors.append(r.stderr.strip())
    raise NativeBuildError(f"compiling {SOURCE.name} with {cc} failed:\n" + "\n".join(errors))


@functools.lru_cache(maxsize=None)
def _warn_single_threaded(cc: str) -> None:
    warnings.warn(f"{cc} cannot build spinquant's kernels with OpenMP: they run single-threaded "
                  "(install libgomp / an OpenMP-capable compiler and clear the kernel cache)", stacklevel=3)


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    act = [i, f, f, f, i, i, f]  # K, qmin, qmax, clip, symmetric, shift, hadamard divisor (0: none)
    lib.sq_simd.restype = i
    lib.sq_threads.restype = i
    lib.sq_quant_act.argtypes = [p, i, i, *act[:1], i, *act[1:], p, p, p]
    lib.sq_quant_act.restype = i
    lib.sq_w4a8_linear.argtypes = [p, i, i, *act, p, p, p, p, i, i, i, p, i]
    lib.sq_w4a8_linear.restype = i
    lib.sq_w8a8_linear.argtypes = [p, i, i, *act, p, i, p, p, i, p, i]
    lib.sq_w8a8_linear.restype = i
    lib.sq_attn_scores.argtypes = [p, p, i, i, i, i, i, i, f, p]
    lib.sq_attn_scores.restype = i
    lib.sq_attn_mix.argtypes = [p, p, i, i, i, i, i, i, p]
    lib.sq_attn_mix.restype = i
    lib.sq_fwht.argtypes = [p, i, i, i, f, p]
    lib.sq_fwht.restype = i
    return lib


def default_flags() -> tuple[str, ...]:
    """Extra compiler flags of the build the model kernels use: $SPINQUANT_NATIVE_FLAGS, e.g. "-mno-avx512f" runs
    the AVX2 path on an AVX-512 machine (how the AVX2 kernels are benchmarked here)."""
    return tuple(os.environ.get("SPINQUANT_NATIVE_FLAGS", "").split())


_LOADED: dict[tuple[str, ...], ctypes.CDLL] = {}
_FAILED: dict[tuple[str, ...], Exception] = {}  # a build that failed once in this process is not tried again


def load(extra_flags: tuple[str, ...] | None = None) -> ctypes.CDLL:
    """The compiled kernels (built on first use; flags: `default_flags()` unless given); raises NativeBuildError
    (or OSError) when they cannot be built or loaded, the same error again without a second compile."""
    flags = default_flags() if extra_flags is None else tuple(extra_flags)
    if flags in _LOADED:
        return _LOADED[flags]
    if flags in _FAILED:
        raise _FAILED[flags]
    import torch  # noqa: F401  (torch's OpenMP runtime is loaded first, so the library links to it)
    try:
        lib = _LOADED[flags] = _declare(ctypes.CDLL(str(build(flags))))
    except (NativeBuildError, OSError) as e:
        _FAILED[flags] = e
        warnings.warn(f"spinquant's native CPU kernels are unavailable, using torch's ops instead: {e}", stacklevel=2)
        raise
    return lib


def mode() -> str:
    """SPINQUANT_NATIVE, read here only: "0" never use the kernels, "1" whenever they build, "auto" (unset) where
    they build with a vector path; the one-token attention and FWHT kernels (no vector path needed) follow 0 too."""
    m = os.environ.get("SPINQUANT_NATIVE", "auto") or "auto"
    if m not in ("0", "1", "auto"):
        raise ValueError(f"SPINQUANT_NATIVE must be 0, 1 or auto, got {m!r}")
    return m


def simd() -> int:
    """The vector path of the default build: 0 portable C loops, 1 AVX-512 VNNI, 2 AVX2, 3 ARMv8.2 sdot."""
    return int(load().sq_simd())


def builds() -> bool:
    """Whether the C kernels compile and load on this machine (any build, vector path or not)."""
    try:
        load()
    except (NativeBuildError, OSError):
        return False
    return True


def available() -> bool:
    """Whether the CPU backend runs quantized activations on these kernels (`mode()`): never at 0, whenever they
    build at 1, at auto when they build with a vector path (AVX-512 VNNI, AVX2 or sdot)."""
    m = mode()
    if m == "0" or not builds():
        return False
    return m == "1" or simd() > 0


def plain_kernels() -> bool:
    """Whether the kernels that need no vector path (one-token attention, FWHT: plain C the compiler vectorizes) run
    here: they build, and `mode()` is not 0."""
    return mode() != "0" and builds()


def omp_threads() -> int:
    """The threads the kernels' OpenMP regions use now (1 in a single-threaded build): torch's OpenMP runtime,
    so `torch.set_num_threads` sets it."""
    return int(load().sq_threads())


def supports_act(spec: QuantSpec | None) -> bool:
    """Activation specs the fused quantizer reproduces bit for bit: dynamic per-token, <= 8 bits, no clip search."""
    return (spec is not None and spec.enabled and spec.bits <= 8 and spec.granularity == "token"
            and spec.clip_search == "none")


def _act_args(spec: QuantSpec, k: int, hadamard: bool = False) -> tuple:
    """The kernels' activation arguments; with `hadamard`, each token is first multiplied by H_k / sqrt(k) (a fused
    online R4, exactly what `fwht` computes)."""
    if hadamard and (k < 1 or k & (k - 1)):
        raise ValueError(f"the fused Hadamard needs a power-of-two width, got {k}")
    div = float(torch.tensor(math.sqrt(k)).float()) if hadamard else 0.0
    return (float(spec.qmin), float(spec.qmax), float(spec.clip_ratio), int(spec.symmetric), -128 - spec.qmin, div)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _input(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    if x.dim() != 2:
        raise ValueError(f"native kernels take activations [tokens, features], got shape {tuple(x.shape)}")
    if not (x.is_floating_point() and x.device.type == "cpu"):
        raise ValueError(f"native kernels take floating-point CPU activations, got {x.dtype} on {x.device}")
    if x.dtype not in (torch.bfloat16, torch.float32):
        x = x.float()
    return x.contiguous(), int(x.dtype == torch.bfloat16)


def _need(t: torch.Tensor | None, name: str, dtype: torch.dtype, shape: tuple) -> None:
    """t is a contiguous CPU tensor of `dtype` and `shape` (None entries: any size), else a ValueError naming it.
    The kernels read with unaligned loads, so no alignment beyond the dtype's is required."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"native kernel argument {name} must be a tensor, got {type(t).__name__}")
    if t.dtype != dtype or t.device.type != "cpu" or t.dim() != len(shape) or \
            any(want is not None and got != want for got, want in zip(t.shape, shape)):
        raise ValueError(f"native kernel argument {name} must be {dtype} {tuple('*' if d is None else d for d in shape)} "
                         f"on the CPU, got {t.dtype} {tuple(t.shape)} on {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"native kernel argument {name} must be contiguous")


W8A8_MAX_K = 65793  # the int8 kernel's int32 sums are exact while K·255·128 < 2^31 (SQ_W8A8_MAX_K in lowbit.c)
W4A8_MAX_GROUP = (2**31 - 1) // (255 * 15)  # per-group int32 sums of the int4 kernel


def _check_rc(rc: int, what: str) -> None:
    if rc == -2:
        raise MemoryError(f"{what}: the native kernel could not allocate its work buffers")
    if rc != 0:
        raise ValueError(f"{what}: the native kernel refused its arguments (code {rc}); this is a bug in the caller")


# ---- layouts ------------------------------------------------------------------------------------------
def tile_int4(u: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit codes u [N, K] (N % 16 == 0, K % 8 == 0) -> uint8 [N/16, K/8, 16, 4] (see the C file)."""
    N, K = u.shape
    v = u.to(torch.uint8).reshape(N // TILE, TILE, K // 8, 2, 4).permute(0, 2, 1, 4, 3)  # [.., 4 bytes, lo / hi]
    return pack_nibbles_raw(v.reshape(N // TILE, K // 8, TILE, 8))


def untile_int4(t: torch.Tensor) -> torch.Tensor:
    """Inverse of tile_int4 -> uint8 [N, K]."""
    NT, KB = t.shape[:2]
    v = unpack_nibbles_raw(t).reshape(NT, KB, TILE, 4, 2)  # [.., 4 bytes, lo / hi]
    return v.permute(0, 2, 1, 4, 3).reshape(NT * TILE, KB * 8)


def tile_groups(v: torch.Tensor) -> torch.Tensor:
    """Per-group values [N, G] -> [N/16, G, 16] (the scales / zeros the kernel reads with a tile)."""
    N, G = v.shape
    return v.reshape(N // TILE, TILE, G).transpose(1, 2).contiguous()


# ---- calls ----------------------------------------------------------------------------------------------
def quant_act(x: torch.Tensor, spec: QuantSpec, k_pad: int | None = None, lib: ctypes.CDLL | None = None,
              hadamard: bool = False):
    """Per-token codes of x [M, K] (of x·H_K / sqrt(K) with `hadamard`): (c int8 [M, k_pad] = v + shift,
    scale float32 [M], zp int32 [M] = zero + shift)."""
    lib = lib or load()
    x, is_bf16 = _input(x)
    M, K = x.shape
    k_pad = k_pad or K
    if k_pad < K:
        raise ValueError(f"activations have {K} features, wider than the kernel's padded width {k_pad}")
    if not supports_act(spec):
        raise ValueError(f"the native kernels quantize dynamic per-token <= 8-bit activations, not {spec}")
    c = torch.empty(M, k_pad, dtype=torch.int8)
    s, zp = torch.empty(M), torch.empty(M, dtype=torch.int32)
    qmin, qmax, clip, sym, shift, had = _act_args(spec, K, hadamard)
    _check_rc(lib.sq_quant_act(x.data_ptr(), is_bf16, M, K, k_pad, qmin, qmax, clip, sym, shift, had, c.data_ptr(),
                               s.data_ptr(), zp.data_ptr()), "quant_act")
    return c, s, zp


def w4a8_linear(x: torch.Tensor, spec: QuantSpec, tiles: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                rsum: torch.Tensor, n: int, group: int, out_dtype: torch.dtype, lib: ctypes.CDLL | None = None,
                hadamard: bool = False):
    """x [M, K] -> [M, n]: int4 tiles [N/16, Kp/8, 16, 4], scales / zeros bf16 [N/16, G, 16], rsum float32 [N];
    with `hadamard` the input is x·H_K / sqrt(K) (the online R4 fused into the activation quantization)."""
    lib = lib or load()
    x, is_bf16 = _input(x)
    M, K = x.shape
    NT = (n + TILE - 1) // TILE
    _need(tiles, "tiles", torch.uint8, (NT, None, TILE, 4))
    kp = tiles.shape[1] * 8
    if K > kp:
        raise ValueError(f"activations have {K} features, wider than the packed weight's padded width {kp}")
    if group < 8 or group % 8 or kp % group:
        raise ValueError(f"group size {group} must be a multiple of 8 dividing the padded width {kp}")
    if group > W4A8_MAX_GROUP:
        raise ValueError(f"group size {group} exceeds {W4A8_MAX_GROUP}, where the kernel's int32 group sums stay exact")
    _need(scales, "scales", torch.bfloat16, (NT, kp // group, TILE))
    if zeros is not None:
        _need(zeros, "zeros", torch.bfloat16, (NT, kp // group, TILE))
    _need(rsum, "rsum", torch.float32, (NT * TILE,))
    if out_dtype not in (torch.bfloat16, torch.float32) or not supports_act(spec):
        raise ValueError(f"w4a8_linear: out_dtype must be bf16 / float32 ({out_dtype}) and the activation spec "
                         f"dynamic per-token <= 8-bit ({spec})")
    y = torch.empty(M, n, dtype=out_dtype)
    _check_rc(lib.sq_w4a8_linear(x.data_ptr(), is_bf16, M, K, *_act_args(spec, K, hadamard), tiles.data_ptr(), scales.data_ptr(),
                                 _ptr(zeros), rsum.data_ptr(), n, kp, group, y.data_ptr(),
                                 int(out_dtype == torch.bfloat16)), "w4a8_linear")
    return y


def w8a8_linear(x: torch.Tensor, spec: QuantSpec, w: torch.Tensor, scale: torch.Tensor, rsum: torch.Tensor,
                out_dtype: torch.dtype, lib: ctypes.CDLL | None = None, hadamard: bool = False):
    """x [M, K] -> [M, N]: w int8 [N, >= K] row-major (extra columns ignored), scale float32 [N], rsum int32 [N]
    (sum over k < K of each row's codes); with `hadamard` the input is x·H_K / sqrt(K) (a fused online R4)."""
    lib = lib or load()
    x, is_bf16 = _input(x)
    M, K = x.shape
    if not isinstance(w, torch.Tensor) or w.dtype != torch.int8 or w.dim() != 2 or w.shape[1] < K or w.stride(1) != 1 \
            or w.device.type != "cpu":
        raise ValueError(f"w8a8_linear needs int8 CPU weights [N, >= {K}] with unit column stride, got "
                         f"{getattr(w, 'dtype', type(w))} {tuple(getattr(w, 'shape', ()))}")
    if K > W8A8_MAX_K:
        raise ValueError(f"w8a8_linear: K = {K} exceeds {W8A8_MAX_K}, where the kernel's int32 sums stay exact "
                         f"(K·255·128 < 2^31); split the layer or use the int4 kernel")
    N = w.shape[0]
    _need(scale, "scale", torch.float32, (N,))
    _need(rsum, "rsum", torch.int32, (N,))
    if out_dtype not in (torch.bfloat16, torch.float32) or not supports_act(spec):
        raise ValueError(f"w8a8_linear: out_dtype must be bf16 / float32 ({out_dtype}) and the activation spec "
                         f"dynamic per-token <= 8-bit ({spec})")
    y = torch.empty(M, N, dtype=out_dtype)
    _check_rc(lib.sq_w8a8_linear(x.data_ptr(), is_bf16, M, K, *_act_args(spec, K, hadamard), w.data_ptr(), w.stride(0),
                                 scale.data_ptr(), rsum.data_ptr(), N, y.data_ptr(), int(out_dtype == torch.bfloat16)),
              "w8a8_linear")
    return y


ATTN_MAX_GROUP = 64  # SQ_ATTN_MAX_G in lowbit.c: query heads per KV head


def attend_one_token(q: torch.Tensor, keys_t: torch.Tensor, values: torch.Tensor, length: int, scale: float,
                     lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """Attention of one query token over the first `length` cached positions, grouped-query heads packed as rows:
    q [H, g, d] float32 (the g query heads of each of H = batch·kv_heads KV heads), keys cached transposed
    keys_t [H, d, L] and values [H, L, d], bf16 or float32, contiguous (L >= length: a static cache) -> float32
    [H, g, d]. Scores and the weighted sum are the C kernels (float32 sums), the softmax between them torch's."""
    lib = lib or load()
    if not (isinstance(q, torch.Tensor) and q.dim() == 3):
        raise ValueError(f"attend_one_token: q must be [heads, group, head_dim], got {getattr(q, 'shape', type(q))}")
    H, g, d = q.shape
    _need(q, "q", torch.float32, (H, g, d))
    if keys_t.dtype not in (torch.bfloat16, torch.float32) or values.dtype != keys_t.dtype:
        raise ValueError(f"attend_one_token: keys / values must both be bf16 or float32, got {keys_t.dtype} / "
                         f"{values.dtype}")
    _need(keys_t, "keys_t", keys_t.dtype, (H, d, None))
    L = keys_t.shape[2]
    _need(values, "values", values.dtype, (H, L, d))
    if not 1 <= length <= L or g > ATTN_MAX_GROUP:
        raise ValueError(f"attend_one_token: length {length} must be in 1..{L} and the group {g} <= {ATTN_MAX_GROUP}")
    bf16 = int(keys_t.dtype == torch.bfloat16)
    s = torch.empty(H, g, length)
    _check_rc(lib.sq_attn_scores(q.data_ptr(), keys_t.data_ptr(), bf16, H, g, d, length, L, float(scale), s.data_ptr()),
              "attend_one_token")
    p = torch.softmax(s, dim=-1)
    o = torch.empty(H, g, d)
    _check_rc(lib.sq_attn_mix(p.data_ptr(), values.data_ptr(), bf16, H, g, d, length, L, o.data_ptr()), "attend_one_token")
    return o


def fwht(x: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x [..., n] (float32 or bf16, n a power of two) -> x·H_n / sqrt(n) float32: the orthonormal Sylvester Hadamard
    (rotation.hadamard.fwht) as one C call, its butterfly stages in the same order in float32."""
    lib = lib or load()
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"native fwht needs a power-of-two width, got {n}")
    xs = x.reshape(-1, n)
    xs, is_bf16 = _input(xs)
    y = torch.empty(xs.shape, dtype=torch.float32)
    _check_rc(lib.sq_fwht(xs.data_ptr(), is_bf16, xs.shape[0], n, float(torch.tensor(math.sqrt(n)).float()),
                          y.data_ptr()), "fwht")
    return y.reshape(x.shape)
