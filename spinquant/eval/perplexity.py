"""Token-level perplexity with a stated protocol.

Protocol (the GPTQ / QuaRot / SpinQuant one when stride == seq_len): the whole test text is tokenized as
one stream, with one BOS at the very start if the tokenizer has one; the stream is cut into windows of
`seq_len` tokens; with stride == seq_len windows do not overlap (a trailing partial window is dropped)
and every window predicts its tokens 2..seq_len from the tokens before them inside the window. With
stride < seq_len windows overlap and each window after the first scores only its last `stride` tokens,
so every token is predicted with at least seq_len - stride tokens of context. ppl = exp(total NLL /
tokens scored); the result records both counts.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import tokenize_dataset


@dataclass
class PerplexityResult:
    ppl: float
    nll_sum: float
    tokens_scored: int
    windows: int
    seq_len: int
    stride: int
    window_nll: list[float] = field(default_factory=list)  # NLL sum of each window, in order (paired comparisons)
    window_tokens: list[int] = field(default_factory=list)  # tokens scored in each window
    kld: "KLDResult | None" = None  # against a reference model on the same windows (perplexity_of_ids(reference=))

    def to_dict(self):
        return asdict(self)


@dataclass
class KLDResult:
    """KL(reference ‖ model) of the next-token distributions, per scored token, on the perplexity's windows: mean,
    99th percentile and maximum over tokens, top-1 agreement (same argmax), and per-window sums for paired SEs."""
    mean: float
    p99: float
    max: float
    top1: float
    tokens: int
    window_kld: list[float] = field(default_factory=list)   # sum of the token KLDs of each window, in order
    window_top1: list[int] = field(default_factory=list)    # tokens of each window whose argmax agrees

    def to_dict(self):
        return asdict(self)


KLD_CHUNK = 64  # positions per float64 chunk: [64, vocab] float64 temporaries, not [window, vocab]


def token_kld(ref_logits: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ref_logits, logits [n, vocab] -> (KL(softmax(ref) ‖ softmax(logits)) [n] float64, same argmax [n] bool).
    Computed in float64, `KLD_CHUNK` positions at a time."""
    kld, same = [], []
    for i in range(0, ref_logits.shape[0], KLD_CHUNK):
        p = torch.log_softmax(ref_logits[i:i + KLD_CHUNK].double(), -1)
        q = torch.log_softmax(logits[i:i + KLD_CHUNK].double(), -1)
        kld.append((p.exp() * (p - q)).sum(-1).clamp_(min=0.0))  # >= 0 exactly; rounding can give -1e-17
        same.append(ref_logits[i:i + KLD_CHUNK].argmax(-1) == logits[i:i + KLD_CHUNK].argmax(-1))
    return torch.cat(kld), torch.cat(same)


def _kld_result(parts: list[torch.Tensor], window_kld: list[float], window_top1: list[int]) -> KLDResult:
    tok = torch.cat(parts)
    n = tok.numel()
    return KLDResult(mean=math.fsum(window_kld) / n, p99=float(np.quantile(tok.numpy(), 0.99)),
                     max=float(tok.max()), top1=sum(window_top1) / n, tokens=n, window_kld=window_kld,
                     window_top1=window_top1)


def _windows(n_tokens: int, seq_len: int, stride: int):
    """(start, end, first scored target index within the window) for each window."""
    if stride == seq_len:
        for s in range(0, n_tokens - seq_len + 1, seq_len):
            yield s, s + seq_len, 1
        return
    prev_end = 0
    for s in range(0, n_tokens - 1, stride):
        e = min(s + seq_len, n_tokens)
        first = max(1, prev_end - s)  # targets already scored by an earlier window are skipped
        yield s, e, first
        prev_end = e
        if e == n_tokens:
            break


@torch.no_grad()
def perplexity_of_ids(model, ids: torch.Tensor, seq_len: int, stride: int | None = None, batch_size: int = 4,
                      max_windows: int | None = None, progress: bool = True, desc: str = "ppl",
                      reference=None) -> PerplexityResult:
    """ids [1, n] -> PerplexityResult over the windows described in the module docstring. `model`: a causal LM
    module, or any callable x [b, L] -> logits [b, L, vocab] (e.g. another runtime, scored with the same protocol).
    `reference` (the FP model, same kinds): also KL(reference ‖ model) on exactly the scored tokens (`.kld`); its
    logits are computed batch by batch beside the model's, never kept."""
    stride = stride or seq_len
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride must be in 1..seq_len={seq_len}, got {stride}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be at least 1 (or None: every window), got {max_windows}")
    ctx = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if ctx is not None and seq_len > ctx:
        raise ValueError(f"seq_len={seq_len} exceeds the model's context (max_position_embeddings={ctx}); evaluate "
                         f"with seq_len <= {ctx}")
    ids = ids.reshape(-1)
    if ids.numel() < seq_len:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}")
    wins = list(_windows(ids.numel(), seq_len, stride))[:max_windows]
    win_nll, win_tok = [], []
    forward = _forward_of(model)
    ref_forward = _forward_of(reference) if reference is not None else None
    kld_parts, win_kld, win_top1 = [], [], []
    for i in tqdm(range(0, len(wins), batch_size), desc=desc, disable=not progress, leave=False):
        chunk = wins[i: i + batch_size]
        if len({e - s for s, e, _ in chunk}) > 1:  # ragged last window of a strided run: one at a time
            groups = [[w] for w in chunk]
        else:
            groups = [chunk]
        for g in groups:
            x = torch.stack([ids[s:e] for s, e, _ in g])
            logits = forward(x)[:, :-1]
            x = x.to(logits.device)
            tok_nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1),
                                      reduction="none").view(x.shape[0], -1)  # [b, L-1]; j predicts token j+1
            if not bool(torch.isfinite(tok_nll).all()):
                raise _nonfinite(model, forward, x, desc)
            for row, (_, _, first) in enumerate(g):
                win_nll.append(tok_nll[row, first - 1:].double().sum().item())
                win_tok.append(tok_nll.shape[1] - (first - 1))
            if ref_forward is not None:
                ref = ref_forward(x)[:, :-1]
                if not bool(torch.isfinite(ref).all()):
                    raise _nonfinite(reference, ref_forward, x, f"{desc}, reference model")
                for row, (_, _, first) in enumerate(g):
                    k, same = token_kld(ref[row, first - 1:], logits[row, first - 1:])
                    kld_parts.append(k)
                    win_kld.append(math.fsum(k.tolist()))
                    win_top1.append(int(same.sum()))
    nll, count = math.fsum(win_nll), sum(win_tok)
    kld = _kld_result(kld_parts, win_kld, win_top1) if ref_forward is not None else None
    return PerplexityResult(math.exp(nll / count), nll, count, len(wins), seq_len, stride, win_nll, win_tok, kld)


def _forward_of(model):
    """x [b, L] -> logits [b, L, vocab] for a causal LM module, or the callable itself."""
    if isinstance(model, torch.nn.Module):
        device = next(model.parameters()).device
        return lambda x: model(x.to(device), use_cache=False).logits
    return model


def _nonfinite(model, forward, x, desc: str):
    from ..numerics import NonFiniteError, nonfinite_activation_error
    if isinstance(model, torch.nn.Module):
        return nonfinite_activation_error(model, lambda: forward(x), f"evaluation ({desc})")
    return NonFiniteError(f"non-finite logits (NaN or Inf) during evaluation ({desc}) from {model!r}")


def perplexity(model, tokenizer, dataset: str, seq_len: int, stride: int | None = None, batch_size: int = 4,
               max_windows: int | None = None, data_root=None, progress: bool = True,
               reference=None) -> PerplexityResult:
    """Perplexity of `model` on a named dataset (spinquant.data.DATASETS) or a text file path (and its KL divergence
    from `reference` on the same windows, when given)."""
    ids = tokenize_dataset(tokenizer, dataset, data_root, add_bos=True)
    return perplexity_of_ids(model, ids, seq_len, stride, batch_size, max_windows, progress, desc=f"ppl {dataset}",
                             reference=reference)


def rolling_windows(n_tokens: int, max_len: int):
    """lm-eval's rolling loglikelihood windows over a document of n tokens preceded by one prefix token (BOS):
    (input start, input end, first scored position) in the prefixed stream [prefix, t0 .. t(n-1)]. The first
    window reads [prefix, t0 .. t(L-2)] and scores t0 .. t(L-1); each later window scores the next L tokens
    with the one token before them as context, and the last (partial) window keeps L tokens of input, so its
    tokens see more context. Every token is scored exactly once."""
    if n_tokens <= 0 or max_len <= 0:
        return
    done = min(max_len, n_tokens)
    yield 0, done, 0  # stream positions 0 .. done-1 predict stream tokens 1 .. done
    while done < n_tokens:
        end = min(done + max_len, n_tokens)  # predict t(done) .. t(end-1) = stream tokens done+1 .. end
        start = max(0, end - max_len)
        yield start, end, done - start
        done = end


@torch.no_grad()
def rolling_loglikelihood(model, ids: list[int], prefix_id: int, max_len: int) -> float:
    """Sum of log p(t_i | t_<i) over a whole document `ids` (no BOS) with the windows of `rolling_windows`."""
    stream = torch.tensor([prefix_id] + list(ids), dtype=torch.long)
    device = next(model.parameters()).device
    total = 0.0
    for start, end, first in rolling_windows(len(ids), max_len):
        x = stream[start:end].unsqueeze(0).to(device)
        logp = torch.log_softmax(model(x, use_cache=False).logits[0].double(), -1)  # [L, vocab]
        targets = stream[start + 1:end + 1].to(device)
        total += logp[first:].gather(-1, targets[first:, None]).sum().item()
    return total


def document_perplexity(model, tokenizer, docs: list[str], max_len: int, words: list[int], nbytes: list[int],
                        progress: bool = True) -> dict:
    """Word / byte perplexity and bits per byte of whole documents (lm-eval's `loglikelihood_rolling` protocol:
    each document on its own, BOS (else EOS) as its first context, windows of `max_len` tokens). `words` /
    `nbytes`: the per-document counts the metrics are normalized by."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ll = 0.0
    for doc in tqdm(docs, desc="rolling ppl", disable=not progress, leave=False):
        ids = tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"]
        ll += rolling_loglikelihood(model, ids, prefix, max_len)
    return {"word_perplexity": math.exp(-ll / sum(words)), "byte_perplexity": math.exp(-ll / sum(nbytes)),
            "bits_per_byte": -ll / sum(nbytes) / math.log(2), "loglikelihood": ll, "documents": len(docs)}
