"""Model loading and family adapters."""
from .adapter import FAMILIES, LLAMA, FamilyAdapter, UnsupportedModelError, get_adapter, register_family, supported_model_types
from .load import load, named_models, resolve_path

__all__ = ["FAMILIES", "LLAMA", "FamilyAdapter", "UnsupportedModelError", "get_adapter", "load", "named_models",
           "register_family", "resolve_path", "supported_model_types"]
