"""Quantizer core: specs, quantize/dequantize math, weight-quantizer registry, fake-quant modules."""
from . import gptq as _gptq  # noqa: F401  (registers "gptq")
from . import rtn as _rtn  # noqa: F401  (registers "rtn")
from .apply import quantize_
from .linear import KVQuantizer, QuantEmbedding, QuantLinear
from .quantizer import compute_qparams, dequantize, fake_quant_grouped, fake_quantize, quantize
from .registry import WEIGHT_QUANTIZERS, QuantizedWeight, get_weight_quantizer, register_weight_quantizer
from .schemes import SCHEMES, QuantConfig, preset
from .spec import QuantSpec

__all__ = ["KVQuantizer", "QuantConfig", "QuantEmbedding", "QuantLinear", "QuantSpec", "QuantizedWeight", "SCHEMES",
           "WEIGHT_QUANTIZERS", "compute_qparams", "dequantize", "fake_quant_grouped", "fake_quantize",
           "get_weight_quantizer", "preset", "quantize", "quantize_", "register_weight_quantizer"]
