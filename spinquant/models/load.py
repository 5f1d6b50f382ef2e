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


def named_models() -> dict[str, Path]:
    """Short names: the shipped reference model and the shared pretrained stories260K."""
    return {"ref-llama": ASSETS / "ref-llama", "stories260k": models_root() / "stories260K"}


def resolve_path(name_or_path: str) -> Path | str:
    names = named_models()
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
