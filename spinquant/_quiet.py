"""Quiets torchao's start-up warnings: transformers imports torchao whenever it is installed (the ExecuTorch export
depends on it), and torchao logs one warning per CUDA extension it cannot load on every start of a CPU-only machine,
and makes torch log a deprecation notice per Enum it registers with pytree. Only torchao's logger level changes
(errors still show; set it back with logging.getLogger("torchao").setLevel), and torch's pytree logger drops only
that one Enum notice."""
import logging

logging.getLogger("torchao").setLevel(logging.ERROR)


def _not_enum_notice(record: logging.LogRecord) -> bool:
    return "is an Enum subclass and is now natively supported" not in str(record.msg)


logging.getLogger("torch.utils._pytree").addFilter(_not_enum_notice)
