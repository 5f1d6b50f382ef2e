"""The lean decode path: a Llama-family model's forward written out for generation (gpt-fast style).

The Hugging Face forward spends a decoded token's time outside the matmuls: a growing KV cache concatenated at every
step, masks and position tensors rebuilt per call, five small ops per RMSNorm, sdpa called per layer. `LeanDecoder`
runs the same model (packed, fake-quant or 16-bit; its modules are used as they are) through

- a static KV cache, preallocated for `max_len` tokens, at the model's KV bit-width where it quantizes K/V
  (`StaticPackedKV`: codes + scales) and in the compute dtype otherwise (`StaticKV`);
- packed q/k/v and gate/up fused into one matmul each (`kernels.fuse.fuse_linears`: one kernel call and one
  activation quantization; the model's own projections become views of the fused weights, so no weight is held
  twice; 16-bit projections stay separate: their memory-mapped weights would stay resident beside a fused copy);
- RoPE tables computed once, RMSNorm as one op, attention of a single token as two small batched matmuls over
  the cache's prefix (grouped-query heads packed as rows);
- logits of the last position only, in float32.

It computes the same function as `model(ids, past_key_values=packed_kv_cache(model), use_cache=True)` (online
R3 / R4 rotations, KV quantization, LoRA adapters and biases included) up to rounding: tests compare the two.

    dec = LeanDecoder(model, max_len=640)
    new_ids = dec.generate(prompt_ids, max_new_tokens=128)       # greedy; or dec.forward(ids) step by step
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kernels import PackedLinear, native
from .kernels.fuse import fuse_linears
from .kernels.kv_cache import StaticKV, StaticPackedKV
from .kernels.linear import apply_transform
from .models.adapter import get_adapter
from .models.state import state_of


class _Layer:
    """What one decoder layer's forward needs: norms (weight, eps), projections (fused where possible), the
    attention's online R3 and KV specs, its cache."""

    def __init__(self, layer: nn.Module, a, fuse: bool):
        attn = a.attention(layer)
        lin = a.layer_linears(layer)
        self.norms = [_norm(layer.get_submodule(a.input_norm)), _norm(layer.get_submodule(a.post_attn_norm))]
        self.sizes = [lin[r].out_features for r in ("q", "k", "v")]
        # packed projections only: 16-bit weights loaded from safetensors are memory-mapped, and copying them into a
        # fused matrix would keep both resident (+1.3 GB on the 1B shape, measured)
        fuse = fuse and all(isinstance(m, PackedLinear) for m in lin.values())
        self.qkv = fuse_linears([lin["q"], lin["k"], lin["v"]]) if fuse else None
        self.q, self.k, self.v = lin["q"], lin["k"], lin["v"]
        self.gate_up = fuse_linears([lin["gate"], lin["up"]]) if fuse else None
        self.gate, self.up, self.o, self.down = lin["gate"], lin["up"], lin["o"], lin["down"]
        self.act = layer.get_submodule(a.mlp).act_fn
        self.silu = isinstance(self.act, nn.SiLU) or type(self.act).__name__ == "SiLUActivation"  # transformers' SiLU
        self.qk_transform = getattr(attn, "qk_transform", None)
        self.kv_quantizer = getattr(attn, "kv_quantizer", None)
        self.cache: StaticKV | StaticPackedKV | None = None

    def project_qkv(self, x):
        """x [b, s, hidden] -> (q and k side by side [b, s, q_out + k_out], v [b, s, v_out])."""
        if self.qkv is not None:
            y = self.qkv(x)
            return y[..., :self.sizes[0] + self.sizes[1]], y[..., self.sizes[0] + self.sizes[1]:]
        return torch.cat([self.q(x), self.k(x)], -1), self.v(x)

    def mlp(self, x):
        if self.gate_up is not None:
            g, u = self.gate_up(x).chunk(2, dim=-1)
        else:
            g, u = self.gate(x), self.up(x)
        if self.silu:  # in place: g is a fresh output of ours
            return self.down(F.silu(g, inplace=True).mul_(u))
        return self.down(self.act(g) * u)


def _norm(m: nn.Module) -> tuple[torch.Tensor, float]:
    eps = getattr(m, "variance_epsilon", getattr(m, "eps", None))
    if eps is None or getattr(m, "weight", None) is None:
        raise ValueError(f"the lean decoder expects RMSNorm layers with a weight and an epsilon, got {type(m).__name__}")
    return m.weight, float(eps)


def _rms_norm(x: torch.Tensor, norm: tuple[torch.Tensor, float]) -> torch.Tensor:
    """Hugging Face's Llama RMSNorm: normalize in float32, back to x's dtype, then scale by the weight."""
    w, eps = norm
    return w * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


class LeanDecoder:
    """Prefill and decode a Llama-family model (Llama, Mistral, Qwen2) with a static KV cache of `max_len` tokens
    for `batch_size` sequences of equal length (no padding). `forward(ids)` appends ids [b, s] at the current
    position and returns the last position's logits [b, vocab] float32 (all positions with `all_logits=True`)."""

    def __init__(self, model: nn.Module, max_len: int, batch_size: int = 1, fuse: bool = True):
        a = get_adapter(model)
        cfg = model.config
        if max_len < 1 or batch_size < 1:
            raise ValueError(f"max_len and batch_size must be positive, got {max_len} and {batch_size}")
        ctx = getattr(cfg, "max_position_embeddings", None)
        if ctx is not None and max_len > ctx:
            raise ValueError(f"max_len {max_len} exceeds the model's context ({ctx} positions)")
        self.model, self.max_len, self.batch = model, max_len, batch_size
        self.embed, self.head, self.final_norm = a.embedding(model), a.head(model), _norm(a.norm(model))
        self.heads, self.kv_heads, self.head_dim = a.num_heads(model), a.num_kv_heads(model), a.head_dim(model)
        self.scaling = self.head_dim ** -0.5
        # one token's attention on spinquant's C kernel where it was measured faster than torch's sdpa (8 KV heads x 4
        # queries of 64, bf16, 512 cached tokens: AVX-512 36.8 against 74.3 µs, AVX2 build 53.7 against 74.3);
        # elsewhere (ARM, the portable loops) it is unmeasured, and torch's sdpa runs
        self.native_attention = native.plain_kernels() and native.simd() in (1, 2)
        self.layers = []
        for layer in a.decoder_layers(model):
            window = getattr(a.attention(layer), "sliding_window", None)
            if window is not None and max_len > window:
                raise ValueError(f"max_len {max_len} exceeds the model's sliding attention window ({window}); the lean "
                                 f"decoder attends to the whole cache")
            self.layers.append(_Layer(layer, a, fuse))
        self.dtype = state_of(model).packed_dtype or next(p.dtype for p in model.parameters()
                                                                  if p.is_floating_point())
        # RoPE (cos, sin) of every position, as the model computes them (float32, then its dtype); sin with the
        # sign of rotate_half folded in, so that rotating is x·cos + roll(x)·sin
        with torch.no_grad():
            pos = torch.arange(max_len)[None]
            cos, sin = a.rotary_embedding(model)(torch.zeros(1, dtype=torch.float32), pos)
        half = self.head_dim // 2
        self.cos = cos[0].to(self.dtype)
        self.sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], -1).to(self.dtype)
        self.reset()

    def reset(self) -> None:
        """Empty the cache (a new sequence starts at position 0)."""
        for layer in self.layers:
            kvq = layer.kv_quantizer
            if kvq is not None:
                layer.cache = StaticPackedKV(self.batch, self.kv_heads, self.max_len, self.head_dim, self.dtype,
                                             kvq.k_spec, kvq.v_spec)
            else:
                layer.cache = StaticKV(self.batch, self.kv_heads, self.max_len, self.head_dim, self.dtype)
        self.pos = 0

    def cache_nbytes(self) -> int:
        return sum(layer.cache.nbytes() for layer in self.layers)

    def _rope(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """x [b, s, heads, d] at positions start .. start + s - 1 (queries and keys in one call)."""
        s = x.shape[1]
        cos, sin = self.cos[start:start + s, None], self.sin[start:start + s, None]
        return x * cos + x.roll(self.head_dim // 2, -1) * sin

    def _attention(self, layer: _Layer, q, k, v, start: int) -> torch.Tensor:
        """q [b, heads, s, d], new k / v [b, kv_heads, s, d] -> [b, s, heads·d]."""
        b, h, s, d = q.shape
        if layer.qk_transform is not None:  # online R3: queries here, keys before they enter the cache; one C call
            # each where native.fwht applies (the module's small torch ops were ~1 ms of a 1B token), back in q's dtype
            q, k = (apply_transform(layer.qk_transform, t).to(t.dtype) for t in (q, k))
        layer.cache.write(start, k, v)
        if s == 1:  # one token: the query heads of each KV head are the rows of one [kv_heads, groups, d] query
            qg = q.reshape(b * self.kv_heads, h // self.kv_heads, d)
            if self.native_attention:
                keys, values = layer.cache.flat(start + 1)
                out = native.attend_one_token(qg.float(), keys, values, start + 1, self.scaling)
            else:  # torch's sdpa with the query heads of each KV head packed as rows (as spinquant_attention does)
                keys, values = layer.cache.read(start + 1)
                out = F.scaled_dot_product_attention(qg.view(b, self.kv_heads, -1, d), keys, values, scale=self.scaling)
            return out.to(q.dtype).reshape(b, 1, h * d)
        if start == 0 and isinstance(layer.cache, StaticKV):
            keys, values = k, v  # a prompt from position 0 attends to exactly what it just wrote
        else:
            keys, values = layer.cache.read(start + s)
        mask = None
        if start > 0:  # a chunk after cached tokens: causal with an offset
            mask = torch.ones(s, start + s, dtype=torch.bool).tril(start)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None,
                                             scale=self.scaling, enable_gqa=self.kv_heads != h)
        return out.transpose(1, 2).reshape(b, s, h * d)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Append ids [b, s] (b = batch_size) -> logits float32 [b, vocab] of the last position ([b, s, vocab] with
        all_logits)."""
        self._check_ids(ids)
        b, s = ids.shape
        start = self.pos
        if start + s > self.max_len:
            raise ValueError(f"{start} cached + {s} new tokens exceed max_len {self.max_len}; reset() or build the "
                             f"decoder with a larger max_len")
        logits = self._forward(ids, start, all_logits)
        if not bool(torch.isfinite(logits).all()):
            self._locate_nonfinite(ids, start, all_logits)
        return logits

    def _check_ids(self, ids) -> None:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != self.batch or ids.shape[1] < 1:
            shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"ids must be a tensor [batch_size={self.batch}, tokens >= 1], got {shape}")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"ids must be integer token ids (torch.long), got dtype {ids.dtype}")
        vocab = getattr(self.embed, "num_embeddings", None) or self.model.config.vocab_size
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"token id {lo if lo < 0 else hi} is outside the vocabulary (0..{vocab - 1})")

    def _locate_nonfinite(self, ids, start: int, all_logits: bool):
        """Re-run the step that produced NaN / Inf logits (it rewrites the same cache positions) with a check after
        each layer's attention and MLP, and raise naming where the values first stopped being finite."""
        from .numerics import NonFiniteError, nonfinite_tensors
        bad = nonfinite_tensors(self.model)
        if bad:
            raise NonFiniteError(f"non-finite logits during decode: model weights hold NaN or Inf in {bad[:5]}")
        where = []
        self._forward(ids, start, all_logits, where)
        self.pos = start  # the step did not happen
        at = where[0] if where else "the final norm / lm_head"
        end = start + ids.shape[1] - 1
        raise NonFiniteError(f"non-finite activations (NaN or Inf) during decode at positions {start}..{end}, first in "
                             f"{at}; the weights are finite, so the values overflow (check the dtype)")

    def _forward(self, ids, start: int, all_logits: bool, where: list | None = None) -> torch.Tensor:
        b, s = ids.shape
        h, kvh, d = self.heads, self.kv_heads, self.head_dim
        x = self.embed(ids).to(self.dtype)
        for i, layer in enumerate(self.layers):
            y = _rms_norm(x, layer.norms[0])
            qk, v = layer.project_qkv(y)
            qk = self._rope(qk.reshape(b, s, h + kvh, d), start)
            q, k = qk[:, :, :h].transpose(1, 2), qk[:, :, h:].transpose(1, 2)
            v = v.view(b, s, kvh, d).transpose(1, 2)
            x = x + layer.o(self._attention(layer, q, k, v, start))
            if where is not None and not where and not bool(torch.isfinite(x).all()):
                where.append(f"layer {i} attention")
            x = x + layer.mlp(_rms_norm(x, layer.norms[1]))
            if where is not None and not where and not bool(torch.isfinite(x).all()):
                where.append(f"layer {i} MLP")
        self.pos = start + s
        x = _rms_norm(x if all_logits else x[:, -1:], self.final_norm)
        logits = self.head(x).float()
        return logits if all_logits else logits[:, -1]

    def generate(self, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy continuation of ids [b, s] from an empty cache -> new ids [b, max_new_tokens]. Arguments are
        checked before the first token: the prompt and all but the last new token must fit in max_len."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        self._check_ids(ids)
        if ids.shape[1] + max_new_tokens - 1 > self.max_len:
            raise ValueError(f"a prompt of {ids.shape[1]} tokens + {max_new_tokens} new tokens needs "
                             f"{ids.shape[1] + max_new_tokens - 1} cache positions, more than max_len {self.max_len}")
        self.reset()
        tok = self.forward(ids).argmax(-1, keepdim=True)
        out = [tok]
        for _ in range(max_new_tokens - 1):
            tok = self.forward(tok).argmax(-1, keepdim=True)
            out.append(tok)
        return torch.cat(out, 1)
