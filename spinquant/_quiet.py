"""Quiets torchao's start-up warnings: transformers imports torchao whenever it is installed (the ExecuTorch export
depends on it), and torchao logs one warning per CUDA extension it cannot load on every start of a CPU-only machine.
Only its logger's level changes (errors still show; set it back with logging.getLogger("torchao").setLevel)."""
import logging

logging.getLogger("torchao").setLevel(logging.ERROR)
