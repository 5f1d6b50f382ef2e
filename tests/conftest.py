import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run under the interpreter; set before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")


def require(module: str):
    """Import an optional runtime for a test module: skipped on a developer machine without it, a failure under CI
    (CI=true), where every runtime in the lock must be installed."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{module} is not importable under CI ({e}); make install installs it from the lock",
                        pytrace=False)
        pytest.skip(f"{module} is not installed", allow_module_level=True)


def skip_outside_ci(reason: str) -> None:
    """Skip on a developer machine that lacks something (a cross compiler, a model, a working C build); fail under
    CI, which installs all of it, so that a broken install cannot turn tests into skips."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI must provide it)", pytrace=False)
    pytest.skip(reason)


def make_tiny(family: str = "llama", tied: bool = False, seed: int = 0, hidden: int = 64, layers: int = 2,
              heads: int = 4, kv_heads: int = 2, intermediate: int = 128, vocab: int = 128):
    """A small random decoder of the Llama family (llama / qwen2 with q/k/v bias / mistral)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
              tie_word_embeddings=tied, attn_implementation="sdpa")
    cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
           "mistral": (MistralConfig, MistralForCausalLM)}[family]
    model = cls[1](cls[0](**kw)).eval()
    with torch.no_grad():  # non-trivial norms and biases so fusions and quantizers see real structure
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            elif n.endswith("bias"):
                p.normal_(0, 0.1)
    return model


@pytest.fixture
def tiny_llama():
    return make_tiny("llama")


@pytest.fixture(scope="session")
def stories():
    from spinquant.models import load
    return load("stories260k")


def _distributed_entry(rank, fn, world, port, args):
    import os
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    fn(*args)


def run_distributed(fn, *args, nprocs: int = 2) -> None:
    """Run fn(*args) in `nprocs` fresh (spawned) processes with torchrun's environment, as
    `torchrun --nproc_per_node nprocs` would: accelerate / torch.distributed set themselves up from it.
    Spawned, not forked: a fork of a process that already ran OpenMP work can hang."""
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_distributed_entry, args=(fn, nprocs, port, args), nprocs=nprocs, start_method="spawn")
