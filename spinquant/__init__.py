"""spinquant: rotate (QuaRot / SpinQuant), quantize (RTN / GPTQ / yours), train (QAT), pack and evaluate LLMs.

The main job in Python (README "Python API"):

    import spinquant as sq
    model, tok = sq.load_model("ref-llama")
    sq.rotate(model, sq.QuaRotConfig())
    sq.quantize_(model, sq.QuantConfig(scheme="W4A8"))
    sq.evaluate(model, tok, sq.EvalConfig(datasets=["wikitext2"], seq_len=512))
    sq.save(sq.pack(model), "out/w4a8", tok)
    sq.LeanDecoder(model, max_len=640).generate(ids, max_new_tokens=128)   # the lean decode path

or the whole run from a config: `sq.run(sq.RunConfig(...))` -> one results row.
"""
from importlib.metadata import PackageNotFoundError, version

from . import _quiet  # noqa: F401  (first: before transformers imports torchao)
from .decode import LeanDecoder
from .export import load as load_packed
from .export import save
from .kernels import pack
from .pipeline import (
    DataConfig,
    EvalConfig,
    KernelsConfig,
    ModelConfig,
    QATRunConfig,
    RunConfig,
    evaluate,
    export_packed,
    load_model,
    run,
)
from .quant import QuantConfig, QuantSpec, quantize_, register_weight_quantizer
from .quant.schemes import ModuleOverride
from .rotation import NoRotation, QuaRotConfig, RotationState, SpinQuantConfig, register_rotation, rotate

try:
    __version__ = version("spinquant")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["DataConfig", "EvalConfig", "KernelsConfig", "LeanDecoder", "ModelConfig", "ModuleOverride", "NoRotation",
           "QATRunConfig", "QuaRotConfig", "QuantConfig", "QuantSpec", "RotationState", "RunConfig", "SpinQuantConfig",
           "__version__", "evaluate", "export_packed", "load_model", "load_packed", "pack", "quantize_",
           "register_rotation", "register_weight_quantizer", "rotate", "run", "save"]
