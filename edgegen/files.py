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
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted(target)
    _remove_leftovers(target, "tmp")
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
        _remove_leftovers(target, "old")


def _remove_leftovers(target: Path, kind: str) -> None:
    for path in target.parent.glob(f".{glob.escape(target.name)}.{kind}-*"):
        shutil.rmtree(path, ignore_errors=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
