"""The FP model's logits computed once per window and kept on disk, to score many files against one FP model.

A deploy run compares a dozen files with the same FP model on the same windows: `CachedLogits(model, folder)` is a
logits callable x [b, L] -> [b, L, vocab] (what `perplexity_of_ids(reference=...)` takes) that runs `model` on a row
the first time it sees its tokens and reads the float32 logits back from `folder` after that (one .npy file per
window, ~100 MB for 512 tokens of a 49k vocabulary: the logits are never all in memory)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from .perplexity import _forward_of


class CachedLogits:
    def __init__(self, model, folder):
        self.forward = _forward_of(model)
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.computed = self.read = 0

    def _file(self, row: torch.Tensor) -> Path:
        key = hashlib.sha256(row.to(torch.int64).cpu().numpy().tobytes()).hexdigest()[:32]
        return self.folder / f"{key}.npy"

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for row in x:
            f = self._file(row)
            if f.is_file():
                out.append(torch.from_numpy(np.load(f)))
                self.read += 1
                continue
            logits = self.forward(row[None])[0].float().cpu()
            tmp = f.with_name(f".{f.stem}.{os.getpid()}.tmp.npy")
            np.save(tmp, logits.numpy())
            os.replace(tmp, f)  # whole files only: an interrupted run leaves no half-written window behind
            self.computed += 1
            out.append(logits)
        return torch.stack(out)
