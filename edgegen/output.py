"""Claiming an output path: what a command may replace, and one writer at a time (torch-free).

A command that writes OUT first claims it, and holds the claim until it is done:
- an existing OUT is refused without `force`, whatever it holds;
- with `force`, only an edgegen artifact of the same kind is replaced (a checkpoint
  for train and import, a bundle for export);
- OUT may not be, contain, or lie inside one of the command's inputs, nor be the
  working directory or one of its parents;
- an advisory lock (`flock` on `.OUT.lock` beside it) keeps a second writer out.
  The kernel drops a lock when its process dies, so a dead writer's lock is simply
  taken over, and the leftover temporary folders of dead writers are removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from edgegen.errors import OutputError

SEAL_FILE = "checkpoint.json"  # a checkpoint's hashes of its own files (files.seal)
SEAL_FORMAT = "edgegen-checkpoint"
BUNDLE_MANIFEST = "manifest.json"

_held: dict[str, tuple[int, int]] = {}  # lock files held here -> (owning thread, depth)
_held_guard = threading.Lock()


def artifact_kind(path: Path) -> str | None:
    """ "checkpoint", "bundle", or None for anything else."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return None
    if _json_field(path / BUNDLE_MANIFEST, "format") == "edgegen-bundle":
        return "bundle"
    if _json_field(path / SEAL_FILE, "format") == SEAL_FORMAT:
        return "checkpoint"
    if (
        _json_field(path / "config.json", "family") in ("gpt", "rnn")
        and (path / "model.safetensors").is_file()
    ):  # written before checkpoints carried their hashes
        return "checkpoint"
    return None


def _json_field(path: Path, key: str):
    """`key` of the JSON object in `path`, or None (a foreign or damaged file says nothing)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data.get(key) if isinstance(data, dict) else None


def describe(path: Path) -> str:
    """What sits at `path`, in a few words, for a refusal."""
    kind = artifact_kind(path)
    if kind:
        return f"an edgegen {kind}"
    if path.is_symlink():
        return "a symbolic link"
    if path.is_file():
        return "a file"
    if path.is_dir():
        entries = sum(1 for _ in path.iterdir())
        return f"a folder with {entries} entries" if entries else "an empty folder"
    return "something that is not a folder"


@contextmanager
def claim_output(
    out: str | Path,
    kind: str,
    *,
    inputs: Iterable[str | Path] = (),
    force: bool = False,
    existing: bool = False,
) -> Iterator[Path]:
    """Hold OUT for writing an artifact of `kind`; `existing`: OUT is one already (resume,
    quantize), which the command reads and validates before it writes a new version."""
    out = Path(out)
    if out.is_symlink():  # a write would replace the link, and a lock name the wrong path
        raise OutputError(f"refusing to write {out}: it is a symbolic link; name its target")
    check_placement(out, inputs)
    with writer_lock(out):
        _recover(out)
        check_replaceable(out, kind, force, existing)
        yield out


def check_placement(out: Path, inputs: Iterable[str | Path]) -> None:
    target = Path(out).resolve()
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise OutputError(f"refusing to write {out}: it is the working directory or holds it")
    for source in inputs:
        path = Path(source).resolve()
        if target == path:
            raise OutputError(f"refusing to write {out}: it is the input {source}")
        if target in path.parents:
            raise OutputError(f"refusing to write {out}: it contains the input {source}")
        if path in target.parents:
            raise OutputError(f"refusing to write {out}: it lies inside the input {source}")


def check_replaceable(out: Path, kind: str, force: bool, existing: bool) -> None:
    if existing:  # the command reads and validates it whole before writing anything
        return
    there = out.exists() or out.is_symlink()
    if not there:
        return
    found = describe(out)
    if not force:
        raise OutputError(f"{out} already exists ({found}); pass --force to replace it")
    if artifact_kind(out) != kind and found != "an empty folder":
        raise OutputError(f"refusing to replace {out} with a {kind}: it holds {found}")


@contextmanager
def writer_lock(target: str | Path) -> Iterator[None]:
    """Exclusive right to write `target` (re-entrant within this process)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.parent / f".{target.name}.lock"
    key = str(lock.resolve())
    me = threading.get_ident()
    with _held_guard:
        owner, depth = _held.get(key, (me, 0))
        if owner != me:  # another thread of this process is writing it
            raise OutputError(f"another thread is writing {target} (pid {os.getpid()})")
        nested = depth > 0
        _held[key] = (me, depth + 1)
    fd = None
    try:
        if not nested:
            fd = _acquire(lock, target)
        yield
    finally:
        with _held_guard:
            _held[key] = (me, _held[key][1] - 1)
            if not _held[key][1]:
                del _held[key]
        if fd is not None:
            _release(lock, fd)


def try_recover(target: str | Path) -> None:
    """For readers: put back an interrupted replacement and clear dead writers' leftovers,
    unless a live writer holds `target` (then its folders are its own business)."""
    target = Path(target)
    if not target.parent.is_dir():  # a reader creates nothing
        return
    try:
        with writer_lock(target):
            _recover(target)
    except (OutputError, OSError):
        return


def _acquire(lock: Path, target: Path) -> int:
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputError(f"another edgegen process is writing {target} (pid {pid})") from None
        # the holder we waited for may have removed the file: lock the one on disk
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def _release(lock: Path, fd: int) -> None:
    with contextlib.suppress(OSError):
        os.unlink(lock)  # before closing, so no one locks a file about to vanish
    os.close(fd)


def _recover(target: Path) -> None:
    from edgegen.files import clear_dead_writers  # files imports this module

    clear_dead_writers(target)
