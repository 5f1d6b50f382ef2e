"""Config sections as dataclasses: a dict becomes the dataclass, and a key that is not one of its fields is an error."""
from __future__ import annotations

from dataclasses import fields


def from_fields(cls, d, where: str, context: str = ""):
    """cls(**d), refusing keys that are not fields of cls; the message names them as `<where>.<key>`."""
    if isinstance(d, cls):
        return d
    d = dict(d or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {', '.join(f'{where}.{k}' for k in unknown)}{context}; {where} takes: "
                         f"{', '.join(sorted(known))}")
    return cls(**d)
