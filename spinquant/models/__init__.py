"""Model loading and family adapters."""
from .adapter import FAMILIES, LLAMA, FamilyAdapter, UnsupportedModelError, get_adapter, register_family, supported_model_types
from .load import check_device, load, load_config, load_tokenizer, named_models, resolve_path

__all__ = ["FAMILIES", "LLAMA", "FamilyAdapter", "UnsupportedModelError", "check_device", "get_adapter", "load",
           "load_config", "load_tokenizer", "named_models", "register_family", "resolve_path", "supported_model_types"]
