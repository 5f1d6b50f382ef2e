"""Datasets and scoring for the shipped offline lm-eval tasks: documents come from the spinquant data root
(`data_root` in the task metadata, else $SPINQUANT_DATA / ../shared/data), never from the hub."""
from __future__ import annotations

from spinquant.data import count_words, load_text, wikitext_detokenize, wikitext_documents


def wikitext2_documents(data_root=None, **_):
    """{"test": Dataset of {"page": article}} from wikitext-2-raw/wiki.test.raw."""
    import datasets
    docs = wikitext_documents(load_text("wikitext2-raw", data_root))
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"page": docs})})


def detokenized(doc) -> str:
    return wikitext_detokenize(doc["page"])


def process_results(doc, results):
    """Per-document (loglikelihood, normalizer) pairs; lm-eval sums both over documents before exponentiating.
    Words and bytes are counted on the raw article (before detokenization)."""
    (ll,) = results
    n_bytes = len(doc["page"].encode("utf-8"))
    return {"word_perplexity": (ll, count_words(doc["page"])), "byte_perplexity": (ll, n_bytes),
            "bits_per_byte": (ll, n_bytes)}
