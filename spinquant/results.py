"""The results row: one JSON object per run (its required fields: REQUIRED_KEYS below), written atomically."""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from .data import REPO_ROOT
from .writes import write_file

# keys that do not change what a run computes, excluded from the run id (`sweep`: which rows a sweep skips;
# `wandb`: where metrics are mirrored; `threads`: CPU threads per run)
NON_SEMANTIC = ("results_dir", "skip_existing", "progress", "device", "checkpoint_dir", "sweep", "wandb", "threads")
REQUIRED_KEYS = ("experiment", "run_id", "model", "scheme", "method", "spec", "metrics", "seed", "git_rev", "config")


def _semantic(c):
    if isinstance(c, dict):
        return {k: _semantic(v) for k, v in c.items() if k not in NON_SEMANTIC and not _absent_default(k, v)}
    if isinstance(c, list):
        return [_semantic(v) for v in c]
    return c


def _absent_default(key: str, value) -> bool:
    """Config keys added after rows were written count as absent at their default, keeping old run ids."""
    if key == "kernels":
        return isinstance(value, dict) and value.get("name") == "none"
    if key == "lm_eval":  # eval.lm_eval with no tasks
        return isinstance(value, dict) and not value.get("tasks")
    if key == "calib_act_quant":
        return value is False
    if key == "kld":  # eval.kld, on by default since KL divergence joined the rows
        return value is True
    if key == "overrides":  # quant.overrides: [] in every preset since the README's example needed the key
        return not value
    return key == "plugins" and not value


def _normalize(config: dict) -> dict:
    """Settings that cannot matter for the run: a disabled QAT's training options (an experiment that sets
    qat.train.* for its QAT rows leaves its PTQ rows' ids unchanged)."""
    qat = config.get("qat")
    if isinstance(qat, dict) and qat.get("name") == "none":
        config = {**config, "qat": {"name": "none"}}
    return config


def run_id(config: dict) -> str:
    """Stable hash of the resolved config, minus non-semantic keys at any depth (progress bars, paths)."""
    c = _semantic(_normalize(config))
    return hashlib.sha256(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()[:12]


def row_path(results_dir, experiment: str, config: dict) -> Path:
    """Where a run's row lives: <results_dir>/<experiment>/<run id>.json (pipeline.run writes it there, and
    scripts/regenerate_tables.py looks there to skip rows that exist)."""
    return Path(results_dir) / experiment / f"{run_id(config)}.json"


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


PAPER_RESULTS = REPO_ROOT / "paper" / "results"


class DirtyTreeError(RuntimeError):
    pass


def is_uncommitted(rev: str) -> bool:
    """A revision that names no commit's code: a dirty tree or no git checkout."""
    return str(rev).endswith("-dirty") or rev == "unknown"


def _committed(path) -> bool:
    p = Path(path).resolve()
    return p == PAPER_RESULTS.resolve() or PAPER_RESULTS.resolve() in p.parents


def revision_for(path=None) -> str:
    """The git revision to record in results written to `path`, checked before any work: the committed rows
    (paper/results) are written only from a clean checkout, so every committed number names the code it came from."""
    rev = git_rev()
    if path is not None and _committed(path) and is_uncommitted(rev):
        raise DirtyTreeError(f"refusing to write {path}: paper/results holds the committed rows and the checkout is "
                             f"{'not a git checkout' if rev == 'unknown' else 'dirty (' + rev + ')'}; commit or stash "
                             f"first, or write to another results_dir")
    return rev


def _write_json(row: dict, path: Path) -> None:
    """Atomically (temp file + rename); a row from a dirty tree never lands in paper/results."""
    if _committed(path) and is_uncommitted(row["git_rev"]):
        raise DirtyTreeError(f"refusing to write {path}: a row from {row['git_rev']} into the committed rows")
    with write_file(path, "results row", _is_row, what="results row") as tmp:
        tmp.write_text(json.dumps(row, indent=2, sort_keys=True) + "\n")


def _is_row(path: Path) -> bool:
    """A JSON object with a git revision: a row this package wrote (one it may replace)."""
    row = json.loads(path.read_text())
    return isinstance(row, dict) and "git_rev" in row


def write_row(row: dict, path: Path) -> None:
    """Write JSON atomically (temp file + rename) so a killed run never leaves a half row; a row from a dirty
    tree never lands in paper/results."""
    missing = [k for k in REQUIRED_KEYS if k not in row]
    if missing:
        raise ValueError(f"results row lacks required keys {missing}")
    _write_json(row, path)


DEPLOY_KEYS = ("model", "runtime", "format", "quantizer", "ppl_runtime", "ppl_framework", "windows", "file_bytes",
               "decode_tok_s", "prefill_tok_s", "git_rev")


def write_deploy_row(row: dict, path: Path) -> None:
    """A deploy-table row (one exported file in its runtime), atomically; the same dirty-tree rule as `write_row`."""
    missing = [k for k in DEPLOY_KEYS if k not in row]
    if missing:
        raise ValueError(f"deploy row lacks required keys {missing}")
    _write_json(row, path)


# config keys that choose what is reported, not what a perplexity is: rows differing only in these must agree
REPORTING = ("experiment_name", "kernels")
REPORTING_EVAL = ("datasets", "lm_eval", "size", "memory")


def computation_key(row: dict) -> str:
    """What determines a row's perplexities: its resolved config minus the non-semantic keys and the reporting
    choices (experiment, which datasets / extra metrics are reported). Two rows with one key are one
    configuration and must have one number per dataset."""
    c = {k: v for k, v in _normalize(row["config"]).items() if k not in REPORTING}
    if isinstance(c.get("eval"), dict):
        c["eval"] = {k: v for k, v in c["eval"].items() if k not in REPORTING_EVAL}
    return json.dumps(_semantic(c), sort_keys=True, default=str)


def conflicting_rows(rows: list[dict], rel: float = 1e-5) -> list[str]:
    """One line per dataset on which rows of one configuration (`computation_key`) report different perplexities
    (beyond `rel`, float noise from thread counts)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(computation_key(r), []).append(r)
    out = []
    for rs in groups.values():
        for ds in sorted({d for r in rs for d in r["metrics"].get("ppl", {})}):
            vals = [(r["metrics"]["ppl"][ds], r) for r in rs if ds in r["metrics"].get("ppl", {})]
            lo, hi = min(v for v, _ in vals), max(v for v, _ in vals)
            if hi - lo > rel * lo:
                where = ", ".join(f"{r.get('_file', r.get('run_id'))} ({r['git_rev']}): {v:.3f}" for v, r in vals)
                out.append(f"{rs[0]['model']} {rs[0]['scheme']} {ds}: {where}")
    return out


class MalformedRowError(ValueError):
    pass


def read_rows(paths) -> list[dict]:
    """Load rows from files or folders of *.json; a malformed row is an error naming its file."""
    files = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"no results at {p}")
        # dot files are a killed writer's temporaries (write_row), never rows
        files += sorted(f for f in p.rglob("*.json") if not f.name.startswith(".")) if p.is_dir() else [p]
    rows = []
    for f in files:
        try:
            row = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise MalformedRowError(f"{f}: not valid JSON ({e})") from None
        missing = [k for k in REQUIRED_KEYS if k not in row] if isinstance(row, dict) else list(REQUIRED_KEYS)
        if missing:
            raise MalformedRowError(f"{f}: results row lacks required keys {missing}")
        if not isinstance(row["metrics"], dict) or not isinstance(row["metrics"].get("ppl", {}), dict):
            raise MalformedRowError(f"{f}: 'metrics' must be an object with a 'ppl' object")
        bad = {k: v for k, v in row["metrics"].get("ppl", {}).items() if isinstance(v, bool) or not isinstance(v, (int, float))}
        if bad:
            raise MalformedRowError(f"{f}: perplexities must be numbers, got {bad}")
        for key, kind in (("method", dict), ("spec", dict), ("scheme", str), ("model", str)):
            if not isinstance(row[key], kind):
                raise MalformedRowError(f"{f}: {key!r} must be a {kind.__name__}, got {type(row[key]).__name__}")
        row["_file"] = str(f)
        rows.append(row)
    return rows
