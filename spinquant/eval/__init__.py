"""Evaluation: perplexity, model size, peak memory."""
from .memory import PeakMemory
from .perplexity import PerplexityResult, perplexity, perplexity_of_ids
from .size import fp16_size_bits, packed_state_dict, size_bits, size_on_disk

__all__ = ["PeakMemory", "PerplexityResult", "fp16_size_bits", "packed_state_dict", "perplexity", "perplexity_of_ids",
           "size_bits", "size_on_disk"]
