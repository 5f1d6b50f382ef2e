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
from dataclasses import asdict, dataclass

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

    def to_dict(self):
        return asdict(self)


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
                      max_windows: int | None = None, progress: bool = True, desc: str = "ppl") -> PerplexityResult:
    """ids [1, n] -> PerplexityResult over the windows described in the module docstring."""
    stride = stride or seq_len
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride must be in 1..seq_len={seq_len}, got {stride}")
    ids = ids.reshape(-1)
    if ids.numel() < seq_len:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}")
    wins = list(_windows(ids.numel(), seq_len, stride))[:max_windows]
    nll, count = 0.0, 0
    device = next(model.parameters()).device
    for i in tqdm(range(0, len(wins), batch_size), desc=desc, disable=not progress, leave=False):
        chunk = wins[i: i + batch_size]
        if len({e - s for s, e, _ in chunk}) > 1:  # ragged last window of a strided run: one at a time
            groups = [[w] for w in chunk]
        else:
            groups = [chunk]
        for g in groups:
            x = torch.stack([ids[s:e] for s, e, _ in g]).to(device)
            logits = model(x, use_cache=False).logits[:, :-1]
            tok_nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1),
                                      reduction="none").view(x.shape[0], -1)  # [b, L-1]; j predicts token j+1
            for row, (_, _, first) in enumerate(g):
                nll += tok_nll[row, first - 1:].double().sum().item()
                count += tok_nll.shape[1] - (first - 1)
    return PerplexityResult(math.exp(nll / count), nll, count, len(wins), seq_len, stride)


def perplexity(model, tokenizer, dataset: str, seq_len: int, stride: int | None = None, batch_size: int = 4,
               max_windows: int | None = None, data_root=None, progress: bool = True) -> PerplexityResult:
    """Perplexity of `model` on a named dataset (spinquant.data.DATASETS) or a text file path."""
    ids = tokenize_dataset(tokenizer, dataset, data_root, add_bos=True)
    return perplexity_of_ids(model, ids, seq_len, stride, batch_size, max_windows, progress, desc=f"ppl {dataset}")
