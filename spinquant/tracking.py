"""wandb: one run per experiment run (config + the results row's metrics; a sweep is a group), and reading back
what an offline run logged (for tests and for checking a run without syncing).

An offline run keeps its records in `<dir>/wandb/offline-run-*/run-*.wandb`: a 7-byte header, then
LevelDB-style log blocks of 32 KiB whose records (7-byte header: crc32, length, type full/first/middle/
last) carry protobuf `Record`s. Only history and summary records are decoded here.
"""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

BLOCK, HEADER = 32768, 7


def _records(data: bytes):
    """The protobuf payloads of a .wandb file's bytes, in order. Stops at the first record that is cut short or
    whose crc32 (over its type byte and payload) does not match: wandb's service process may be mid-write."""
    pos, buf = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:  # zero padding up to the end of the block
            pos += left
            continue
        chunk, pos = data[pos + HEADER:pos + HEADER + length], pos + HEADER + length
        if len(chunk) < length or zlib.crc32(bytes([kind]) + chunk) != crc:  # a record still being written
            return
        if kind == 1:
            yield chunk
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            yield buf + chunk
            buf = b""


def wandb_settings(wandb):
    """start_method="thread" avoids hangs under Hydra on older wandb; newer wandb (pydantic settings) has
    no such option and rejects it. Silent: the results row, not wandb's console lines, is the output
    (`start_run` prints the run's address itself when it syncs online)."""
    for kw in ({"start_method": "thread", "silent": True}, {"silent": True}, {"quiet": True}, {}):
        try:
            return wandb.Settings(**kw)
        except Exception:  # pydantic ValidationError (wandb >= 0.19), TypeError on older ones
            continue


def start_run(config: dict, mode: str = "offline", project: str = "spinquant", group: str | None = None,
              name: str | None = None, run_dir: str | Path | None = None, run_id: str | None = None):
    """wandb.init for one experiment run (None when mode is "disabled"); QAT training logs into the same run."""
    if mode not in ("offline", "online", "disabled"):
        raise ValueError(f"wandb.mode must be offline, online or disabled, got {mode!r}")
    if mode == "disabled":
        return None
    import wandb
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=project, group=group, name=name, mode=mode, dir=str(run_dir) if run_dir else None,
                     config=config, id=run_id, resume="allow", settings=wandb_settings(wandb), reinit="finish_previous")
    if mode == "online" and getattr(run, "url", None):
        print(f"wandb: {run.url}")
    return run


def flatten(d: dict, prefix: str = "") -> dict:
    """{"ppl": {"wikitext2": 1.0}} -> {"ppl/wikitext2": 1.0}; lists and None are left out (summaries hold scalars)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
    return out


def log_row(run, row: dict) -> None:
    """Mirror a results row into its wandb run: every metric (flattened) into the summary and one history
    step, plus the row's identity (scheme, method, run_id, git_rev); then finish the run."""
    if run is None:
        return
    metrics = flatten(row["metrics"])
    ident = {"scheme": row["scheme"], "run_id": row["run_id"], "git_rev": row["git_rev"], "model": row["model"],
             **{f"method/{k}": v for k, v in row["method"].items()}}
    run.log(metrics)
    run.summary.update({**metrics, **ident})
    run.finish()


def read_offline_run(run_dir: str | Path) -> tuple[list[dict], dict]:
    """(history rows, final summary) of an offline wandb run folder (`.../wandb/offline-run-*`) or of a folder
    holding exactly one such run under `wandb/`."""
    history, summary, _ = read_offline_run_full(run_dir)
    return history, summary


def _parse_run(data: bytes) -> tuple[list[dict], dict, dict, bool]:
    """(history rows, summary, config, whether the exit record is there) of a .wandb file's bytes."""
    from wandb.proto import wandb_internal_pb2 as pb
    history, summary, config, finished = [], {}, {}, False
    for raw in _records(data):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.summary.update})
        elif kind in ("run", "config"):  # the run record carries the initial config (and the group)
            items = rec.run.config.update if kind == "run" else rec.config.update
            for i in items:
                v = json.loads(i.value_json)
                config[i.key or "/".join(i.nested_key)] = v.get("value", v) if isinstance(v, dict) and "value" in v else v
            if kind == "run" and rec.run.run_group:
                config["_group"] = rec.run.run_group
        elif kind == "exit":
            finished = True
    return history, summary, config, finished


def read_offline_run_full(run_dir: str | Path, wait_s: float = 30.0) -> tuple[list[dict], dict, dict]:
    """(history rows, final summary, config) of an offline wandb run (see read_offline_run); the run's group, if
    any, is config["_group"]. wandb's service process may still be writing the file after `run.finish()`
    returns, so this waits (up to wait_s) for the run's exit record."""
    import time
    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("*.wandb")) or sorted(run_dir.glob("wandb/offline-run-*/*.wandb"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one offline wandb run under {run_dir}, found {len(files)} .wandb files")
    deadline = time.monotonic() + wait_s
    while True:
        history, summary, config, finished = _parse_run(files[0].read_bytes())
        if finished:
            return history, summary, config
        if time.monotonic() > deadline:
            raise TimeoutError(f"{files[0]}: the wandb run has no exit record after {wait_s:.0f} s (still running?)")
        time.sleep(0.2)
