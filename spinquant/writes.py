"""Safe output writes: every writer (packed folders, compressed-tensors folders, GGUF / ExecuTorch files, rotation
files, results rows) goes through here, so none removes what it did not write.

    check_dir(path, "spinquant-packed")            # before any work: refuses a path that cannot become the output
    with write_dir(path, "spinquant-packed") as tmp:
        ...write files into tmp...                 # on success they appear in `path`; on failure tmp is removed

Rules. A folder output records the files it wrote in `MANIFEST`; writing again into a folder that holds a previous
output of the same writer replaces exactly the files that output listed, and keeps anything else in the folder.
A non-empty folder that is not such an output is refused unless `overwrite=True`, which then replaces only the files
the writer writes (same names) and keeps the rest. A file output replaces an existing file only if `recognise` says
it is one of the writer's own (a GGUF over a GGUF), else `overwrite=True` is needed. A folder where a file is
expected (or the reverse), a name the OS cannot hold, or an unwritable parent is an `OutputPathError` raised
before any work. Temporary files live beside the target (same file system, so renames are atomic) and are removed
on every failure path.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

MANIFEST = ".spinquant-output.json"
NAME_MAX = 255     # bytes per path component (Linux, macOS)
PATH_MAX = 4096


class OutputPathError(ValueError):
    """An output path that cannot be written as asked; the message names the path and what to do."""


def _check_name(path: Path, what: str) -> None:
    s = os.fsencode(str(path.absolute()))
    if len(s) >= PATH_MAX:
        raise OutputPathError(f"{what} path is {len(s)} bytes long, more than the OS allows ({PATH_MAX - 1}): "
                              f"{str(path)[:60]}…")
    for part in path.absolute().parts:
        if len(os.fsencode(part)) > NAME_MAX:  # temporary names use at most 100 characters of it
            raise OutputPathError(f"{what} path has a component of {len(os.fsencode(part))} bytes, more than the OS "
                                  f"allows ({NAME_MAX}): {part[:60]}…")


def _check_parent(path: Path, what: str) -> None:
    """Every existing ancestor is a folder, and the nearest existing one is writable."""
    for p in reversed(path.absolute().parents):
        if p.exists() and not p.is_dir():
            raise OutputPathError(f"cannot write {what} {path}: {p} is a file, not a folder")
    existing = next(p for p in path.absolute().parents if p.exists())
    try:  # a real probe: access() says yes to root on read-only or virtual file systems (/proc)
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".spinquant-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise OutputPathError(f"cannot write {what} {path}: {existing} is not writable ({e.strerror})") from None


def _manifest(folder: Path) -> dict | None:
    try:
        m = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or not isinstance(m.get("files"), list) or not isinstance(m.get("writer"), str):
        return None
    return m


def previous_output(folder: Path, writer: str) -> bool:
    """Whether `folder` holds an output of `writer` (it has a manifest written by it)."""
    m = _manifest(Path(folder))
    return m is not None and m["writer"] == writer


def check_dir(path, writer: str, overwrite: bool = False, what: str = "output folder") -> Path:
    """Refuse, before any work, a folder output that would fail or would replace what the writer does not own."""
    path = Path(path)
    _check_name(path, what)
    _check_parent(path, what)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"cannot write {what} {path}: it exists and is a file (give a new folder name)")
    if path.is_dir() and any(path.iterdir()) and not overwrite and not previous_output(path, writer):
        listing = sorted(p.name for p in path.iterdir())
        raise OutputPathError(f"{what} {path} exists and holds files not written by {writer} "
                              f"({', '.join(listing[:5])}{' …' if len(listing) > 5 else ''}); refusing to write into it. "
                              f"Give a new or empty folder, or pass overwrite=True (--overwrite), which replaces only "
                              f"the files this export writes and keeps the others")
    if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot write {what} {path}: the folder is not writable")
    return path


def check_file(path, writer: str, recognise: Callable[[Path], bool] | None = None, overwrite: bool = False,
               what: str = "output file") -> Path:
    """Refuse, before any work, a file output that is a folder, cannot be created, or would replace a file that is
    not one of the writer's own (`recognise(path)`) without `overwrite`."""
    path = Path(path)
    _check_name(path, what)
    _check_parent(path, what)
    if path.is_dir():
        raise OutputPathError(f"cannot write {what} {path}: it is an existing folder; give a file name, e.g. "
                              f"{path / ('model' + (path.suffix or '.out'))}")
    if path.exists() and not overwrite and not (recognise is not None and _safe(recognise, path)):
        raise OutputPathError(f"{what} {path} exists and is not recognised as {writer} output; refusing to replace "
                              f"it. Give another name, or pass overwrite=True (--overwrite)")
    return path


def _safe(recognise, path) -> bool:
    try:
        return bool(recognise(path))
    except Exception:  # noqa: BLE001 - an unreadable file is simply not recognised as ours
        return False


@contextlib.contextmanager
def write_file(path, writer: str, recognise: Callable[[Path], bool] | None = None, overwrite: bool = False,
               what: str = "output file") -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds it is renamed onto `path` (atomic), when it
    fails it is removed. The checks of `check_file` run first."""
    path = check_file(path, writer, recognise, overwrite, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:100]}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def write_text(path, text: str, what: str = "generated document") -> Path:
    """Replace the text file `path` atomically (tables, LaTeX, README splices: documents regenerated from the rows,
    so replacing them is their purpose); a failure leaves the old file whole and no temporary behind."""
    with write_file(path, "spinquant", overwrite=True, what=what) as tmp:
        tmp.write_text(text)
    return Path(path)


@contextlib.contextmanager
def write_dir(path, writer: str, overwrite: bool = False, what: str = "output folder") -> Iterator[Path]:
    """Yield a temporary folder beside `path`; when the block succeeds its files become the output (see the module
    docstring for what is replaced and what is kept), when it fails it is removed."""
    path = check_dir(path, writer, overwrite, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name[:100]}.", suffix=".tmp"))
    try:
        yield tmp
        _commit_dir(tmp, path, writer, overwrite, what)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def _commit_dir(tmp: Path, path: Path, writer: str, overwrite: bool, what: str) -> None:
    new = [f for f in _files(tmp) if f != MANIFEST]
    (tmp / MANIFEST).write_text(json.dumps({"writer": writer, "files": new}, indent=1) + "\n")
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        if path.exists():
            path.rmdir()
        try:
            os.replace(tmp, path)  # the whole folder appears at once
            return
        except OSError as e:  # created meanwhile by someone else: fall through to the merge
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    check_dir(path, writer, overwrite, what)  # again: the folder may have changed while the model was quantized
    old = _manifest(path) if previous_output(path, writer) else None
    owned = set(old["files"]) if old else set()
    present = set(_files(path)) - {MANIFEST}
    if old is not None and present <= owned:  # nothing but a previous output: swap folders (atomic per rename)
        aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name[:100]}.", suffix=".old"))
        aside.rmdir()
        os.replace(path, aside)
        os.replace(tmp, path)
        shutil.rmtree(aside, ignore_errors=True)
        return
    for rel in sorted(owned - set(new)):  # files of the previous output this one does not write again
        p = path / rel
        if p.is_file() or p.is_symlink():
            p.unlink()
    for rel in new:  # the manifest last: until it is in place, the folder is not called a finished output
        dst = path / rel
        if dst.is_dir() and not dst.is_symlink():
            raise OutputPathError(f"cannot write {what} {path}: {dst} is a folder where this export writes a file")
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / rel, dst)
    os.replace(tmp / MANIFEST, path / MANIFEST)
