"""File helpers shared by both sides (torch-free): atomic directories, hashes, JSON."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgegen.errors import CheckpointError
from edgegen.output import SEAL_FILE, SEAL_FORMAT, writer_lock

PARKED = "previous"  # where a replaced directory waits until its successor is in place


def write_atomically(target: Path, fill: Callable[[Path], None]) -> None:
    """Build a directory with `fill(tmp_dir)`, then move it to `target` by renaming.

    An existing `target` is replaced only after the new one is complete; if
    `fill` fails, the temporary directory is removed and `target` is untouched.
    A process killed between the two renames of a replacement leaves the old
    directory parked beside `target`; `recover_interrupted` puts it back, and
    the next write or read of `target` calls it.
    """
    target = Path(target)
    with writer_lock(target):  # so the leftovers removed here belong to dead writers
        clear_dead_writers(target)
        _replace_with(target, fill)


def clear_dead_writers(target: Path) -> None:
    """Put back a replacement killed between its renames and remove the temporary folders
    writers left behind. Only under `target`'s writer lock: then no live writer owns them."""
    recover_interrupted(target)
    remove_leftovers(target, "tmp")


def _replace_with(target: Path, fill: Callable[[Path], None]) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        fill(tmp)
        _fsync_tree(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / PARKED)
            os.replace(tmp, target)
            _fsync_dir(target.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
            _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def recover_interrupted(target: Path) -> None:
    """Undo a replacement that was killed between its two renames: with `target`
    missing, the last complete version is the parked one, so it moves back."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    if not target.exists():
        parked = sorted(
            target.parent.glob(f".{glob.escape(target.name)}.old-*/{PARKED}"),
            key=lambda p: p.stat().st_mtime,
        )
        if parked:
            try:
                os.replace(parked[-1], target)
            except OSError:  # read-only location: leave it for a writer to recover
                return
    if target.exists():
        remove_leftovers(target, "old")


def remove_leftovers(target: Path, kind: str) -> None:
    for path in target.parent.glob(f".{glob.escape(target.name)}.{kind}-*"):
        shutil.rmtree(path, ignore_errors=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def seal(directory: Path) -> None:
    """Write SEAL_FILE: the sha256 of every other file in `directory`, checked on load."""
    directory = Path(directory)
    files = {
        p.name: sha256_file(p)
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != SEAL_FILE
    }
    write_json(directory / SEAL_FILE, {"format": SEAL_FORMAT, "version": 1, "files": files})


def check_seal(directory: Path, names: tuple[str, ...] | list[str]) -> None:
    """Raise CheckpointError unless each of `names` matches the hash sealed for it."""
    directory = Path(directory)
    try:
        sealed = json.loads((directory / SEAL_FILE).read_text())["files"]
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint {directory} has no {SEAL_FILE} (the hashes of its files); "
            "it was not written by this edgegen"
        ) from None
    except (OSError, ValueError, KeyError, TypeError):
        sealed = None
    if not isinstance(sealed, dict):
        raise CheckpointError(f"checkpoint {directory}: {SEAL_FILE} is damaged")
    for name in names:
        if name not in sealed:
            raise CheckpointError(f"checkpoint {directory}: {SEAL_FILE} does not list {name}")
        if not (directory / name).is_file():
            raise CheckpointError(f"checkpoint {directory} is missing {name}")
        if sha256_file(directory / name) != sealed[name]:
            raise CheckpointError(
                f"checkpoint {directory}: {name} does not match its recorded sha256 "
                "(the file is damaged or was changed)"
            )


def write_json(path: Path, data: Any) -> None:
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
