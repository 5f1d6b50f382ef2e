"""Where the data lives: `SPINQUANT_DATA`, else `../shared/data` next to the checkout, else the cache.

Named datasets map to files under that root (see `DATASETS`); a missing file is a clear error that
says how to get it, never a stack trace.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

# name -> (relative path under the data root, what it is)
DATASETS = {
    "wikitext2": ("wikitext-2-raw/wiki.test.joined.txt", "WikiText-2 raw test, '\\n\\n'-joined (papers' protocol)"),
    "wikitext2-tok": ("wikitext-2/test.txt", "WikiText-2 tokenized test"),
    "wikitext2-valid": ("wikitext-2/valid.txt", "WikiText-2 tokenized validation"),
    "wikitext2-train": ("wikitext-2/train.txt", "WikiText-2 tokenized train (calibration / training)"),
    "python-docs": ("python-docs/test.txt", "Python 3.11 docs, test split"),
    "python-docs-train": ("python-docs/train.txt", "Python 3.11 docs, train split"),
    "ptb": ("ptb/ptb.test.txt", "Penn Treebank test"),
    "wikitext2-raw": ("wikitext-2-raw/wiki.test.raw", "WikiText-2 raw test as released (split into articles for "
                      "document-level perplexity: wikitext_documents)"),
}


class DataError(FileNotFoundError):
    """A dataset or data root that cannot be found; the message says how to fix it."""


def data_root(override: str | os.PathLike | None = None) -> Path:
    """Resolve the data root: explicit override > $SPINQUANT_DATA > ../shared/data > ~/.cache/spinquant/data."""
    candidates = []
    if override:
        candidates.append(Path(override).expanduser())
    elif os.environ.get("SPINQUANT_DATA"):
        candidates.append(Path(os.environ["SPINQUANT_DATA"]).expanduser())
    else:
        candidates += [REPO_ROOT.parent / "shared" / "data", Path.home() / ".cache" / "spinquant" / "data"]
    for c in candidates:
        if c.is_dir():
            return c
    raise DataError(
        f"no data root found (tried: {', '.join(str(c) for c in candidates)}). Set SPINQUANT_DATA to a folder "
        f"holding e.g. wikitext-2-raw/wiki.test.joined.txt and wikitext-2/train.txt (layout: spinquant/data.py)."
    )


def dataset_path(name: str, root: str | os.PathLike | None = None) -> Path:
    """Path of a named dataset (see DATASETS) or of a literal file path; clear error if missing."""
    if name in DATASETS:
        path = data_root(root) / DATASETS[name][0]
    elif Path(name).suffix:
        path = Path(name).expanduser()
    else:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)} (or pass a path to a .txt file)")
    if not path.is_file():
        raise DataError(f"missing data file for {name!r}: {path} does not exist. "
                        f"Point SPINQUANT_DATA (or data.root in the config) at the folder that holds it.")
    return path


# named datasets that can also come from the hub when online: name -> (dataset, config, split)
HUB_FALLBACK = {"wikitext2": ("wikitext", "wikitext-2-raw-v1", "test")}


def _from_hub(name: str) -> str | None:
    """The papers' text ("\\n\\n".join of the rows) from the hub, or None when offline / unavailable."""
    if name not in HUB_FALLBACK or os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        return None
    try:
        from datasets import load_dataset
        ds = load_dataset(*HUB_FALLBACK[name][:2], split=HUB_FALLBACK[name][2])
        return "\n\n".join(ds["text"])
    except Exception:  # noqa: BLE001 - offline or no datasets: fall back to the clear local error
        return None


def load_text(name: str, root: str | os.PathLike | None = None) -> str:
    """Text of a named dataset (local file under the data root; `wikitext2` from the hub if missing and online)."""
    try:
        path = dataset_path(name, root)
    except DataError:
        text = _from_hub(name)
        if text is None:
            raise
        return text
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"dataset {name!r} is empty: nothing to evaluate or calibrate on")
    return text


def tokenize(tokenizer, text: str, add_bos: bool = True) -> torch.Tensor:
    """Encode a whole text as one stream, shape [1, n]; BOS (if the tokenizer has one) only at the very start."""
    if not text.strip():
        raise ValueError("empty text: nothing to tokenize")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    if add_bos and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    return torch.tensor(ids, dtype=torch.long).unsqueeze(0)


_TOKEN_CACHE: dict = {}


def tokenize_dataset(tokenizer, name: str, root=None, add_bos: bool = True) -> torch.Tensor:
    """tokenize(load_text(name)) memoised per (tokenizer, file, mtime) within the process: a sweep in one
    process tokenizes each text once."""
    try:
        path = dataset_path(name, root)
        source = (str(path), path.stat().st_mtime_ns)
    except DataError:
        path, source = None, ("hub", name)  # load_text below tries the hub, or raises the clear error
    key = (getattr(tokenizer, "name_or_path", id(tokenizer)), len(tokenizer), *source, add_bos)
    if key not in _TOKEN_CACHE:
        _TOKEN_CACHE[key] = tokenize(tokenizer, load_text(str(path) if path else name, root), add_bos=add_bos)
    return _TOKEN_CACHE[key]


def calibration_batch(tokenizer, name: str = "wikitext2-train", n_samples: int = 128, seq_len: int = 512,
                      seed: int = 0, root=None) -> torch.Tensor:
    """Random windows from a *train* split, shape [n_samples, seq_len] (GPTQ/SpinQuant calibration)."""
    ids = tokenize_dataset(tokenizer, name, root, add_bos=False)[0]
    if ids.numel() <= seq_len:
        raise ValueError(f"calibration text {name!r} has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len - 1, (n_samples,), generator=g)
    return torch.stack([ids[s: s + seq_len] for s in starts])


_ARTICLE_TITLE = re.compile(r"^ = [^=].* = $")  # " = Robert Boulter = ": a top-level heading starts an article


def wikitext_documents(text: str) -> list[str]:
    """Split raw WikiText-2 (`wiki.test.raw`) into its articles, each starting at its top-level heading line
    (the documents of lm-eval's document-level wikitext task: 62 in the test split)."""
    docs, cur = [], []
    for line in text.splitlines(keepends=True):
        if _ARTICLE_TITLE.match(line.rstrip("\n")) and any(x.strip() for x in cur):
            docs.append("".join(cur))
            cur = []
        if cur or line.strip():
            cur.append(line)
    if any(x.strip() for x in cur):
        docs.append("".join(cur))
    return docs


_DETOK = [("s '", "s'"), (" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "), (" . ", ". "),
          (" ! ", "! "), (" ? ", "? "), (" , ", ", ")]
_DETOK_BRACKETS = [(r"\(\s*([^)]*?)\s*\)", r"(\1)"), (r"\[\s*([^\]]*?)\s*\]", r"[\1]"), (r"{\s*([^}]*?)\s*}", r"{\1}"),
                   (r'"\s*([^"]*?)\s*"', r'"\1"'), (r"'\s*([^']*?)\s*'", r"'\1'")]  # no spaces inside brackets, quotes
_DETOK_LATE = [("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" \u00b0 ", "\u00b0"), (" \n", "\n"),
               ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")]


def wikitext_detokenize(text: str) -> str:
    """Undo WikiText's tokenization (" @-@ " -> "-", " , " -> ", ", spaces inside brackets and quotes...), as
    lm-eval's wikitext task does before scoring a document."""
    for a, b in _DETOK:
        text = text.replace(a, b)
    for pattern, repl in _DETOK_BRACKETS:
        text = re.sub(pattern, repl, text)
    for a, b in _DETOK_LATE:
        text = text.replace(a, b)
    return text


def count_words(text: str) -> int:
    """Words of a document for word perplexity: pieces between runs of whitespace, counted on the text before
    detokenization (lm-eval's convention, so word perplexities are comparable across tokenizers)."""
    return len(re.split(r"\s+", text))
