"""wandb helpers: read back what an offline run logged (for tests and for checking a run without syncing).

An offline run keeps its records in `<dir>/wandb/offline-run-*/run-*.wandb`: a 7-byte header, then
LevelDB-style log blocks of 32 KiB whose records (7-byte header: crc32, length, type full/first/middle/
last) carry protobuf `Record`s. Only history and summary records are decoded here.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK, HEADER = 32768, 7


def _records(data: bytes):
    pos, buf = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:  # zero padding up to the end of the block
            pos += left
            continue
        chunk, pos = data[pos + HEADER:pos + HEADER + length], pos + HEADER + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            yield buf + chunk
            buf = b""


def read_offline_run(run_dir: str | Path) -> tuple[list[dict], dict]:
    """(history rows, final summary) of an offline wandb run folder (`.../wandb/offline-run-*`) or of a folder
    holding exactly one such run under `wandb/`."""
    from wandb.proto import wandb_internal_pb2 as pb
    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("*.wandb")) or sorted(run_dir.glob("wandb/offline-run-*/*.wandb"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one offline wandb run under {run_dir}, found {len(files)} .wandb files")
    history, summary = [], {}
    for raw in _records(files[0].read_bytes()):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.summary.update})
    return history, summary
