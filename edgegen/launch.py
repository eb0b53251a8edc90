"""Starting a training run in several local processes (`edgegen train --nproc N`), the way
torchrun does: one process per rank, told its place by torchrun's environment variables
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Torch-free, so the launching
process stays small; the ranks themselves are `python -m edgegen ...` (distributed.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import os
import signal
import socket
import subprocess
import sys
from typing import NoReturn

from edgegen.errors import ConfigError


def launched_size() -> int | None:
    """The number of processes torchrun (or `--nproc`) started this one among, or None."""
    size = os.environ.get("WORLD_SIZE")
    return int(size) if size and "RANK" in os.environ else None


_rank_pid: int | None = None  # this process's id, once it is one rank of a run


def as_rank() -> None:
    """Set up this process as one rank of a run, ended by `end_rank`. A rank ended by a
    fatal signal prints where each of its threads was: it cannot say why in a line."""
    global _rank_pid
    faulthandler.enable()
    _rank_pid = os.getpid()


def is_rank() -> bool:
    """Whether this process (not a child forked from it) is a rank of a run."""
    return _rank_pid == os.getpid()


def end_rank(code: int | str | None) -> NoReturn:
    """End a rank process whose run is over (its checkpoint written, its process group
    destroyed) with `code`, skipping the interpreter's teardown.

    torch's C++ threads and objects outlive the Python code that used them, and their
    destructors at teardown aborted a finished rank now and then ("terminate called
    without an active exception", exit 134) on a loaded machine. Nothing of the run is
    left to lose by then: files are closed, and stdout and stderr are flushed here."""
    if code is not None and not isinstance(code, int):
        with contextlib.suppress(OSError, ValueError):  # as SystemExit would have said it
            print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe has no reader left
            stream.flush()
    with contextlib.suppress(OSError, AttributeError):  # what C code buffered (torch's)
        ctypes.CDLL(None).fflush(None)
    os._exit(code or 0)


def check_world(nproc: int, batch_size: int) -> None:
    """Refuse a process count that cannot share the batch: every rank takes at least one
    row of each micro-batch."""
    if nproc < 1:
        raise ConfigError(f"nproc must be positive, got {nproc}")
    if batch_size < nproc:
        raise ConfigError(
            f"batch size {batch_size} cannot be shared by {nproc} processes: "
            "each takes at least one row (raise --batch-size or lower --nproc)"
        )


def launch(argv: list[str], nproc: int) -> int:
    """Run `python -m edgegen *argv` as ranks 0..nproc-1 of one run and wait for all of them.

    Returns the exit status to end with: 0 when every rank succeeded, else the first
    failure's. The ranks print their own errors (rank 0 for a reason they share); a rank
    ended by a signal is named here, since it could not say so itself. Ctrl-C reaches the
    ranks from the terminal (they stop together after saving), so it is ignored here.
    """
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
    }
    # as torchrun does: N processes with all cores each would fight over them
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    command = [sys.executable, "-m", "edgegen", *argv]
    ranks = [
        subprocess.Popen(command, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
        for r in range(nproc)
    ]
    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
        signal.SIGTERM: signal.signal(signal.SIGTERM, _exit_on_sigterm),
    }
    try:
        codes = [rank.wait() for rank in ranks]
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
    for r, code in enumerate(codes):
        if code < 0:
            name = signal.Signals(-code).name
            print(f"error: rank {r} was ended by {name}", file=sys.stderr)
    failed = [128 - code if code < 0 else code for code in codes if code != 0]
    return failed[0] if failed else 0


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # the ranks are killed on the way out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
