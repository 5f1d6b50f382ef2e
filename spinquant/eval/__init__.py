"""Evaluation: perplexity (papers' windows and lm-eval's rolling documents), lm-eval tasks (harness.py), size,
peak memory."""
from .memory import PeakMemory
from .perplexity import PerplexityResult, document_perplexity, perplexity, perplexity_of_ids, rolling_loglikelihood
from .size import fp16_size_bits, packed_state_dict, size_bits, size_on_disk

__all__ = ["PeakMemory", "PerplexityResult", "document_perplexity", "fp16_size_bits", "packed_state_dict", "perplexity",
           "perplexity_of_ids", "rolling_loglikelihood", "size_bits", "size_on_disk"]
