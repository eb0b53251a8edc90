"""Back a loaded model's weights with 2 MB pages (Linux transparent huge pages).

A decode step streams every weight through the CPU once. On 4 KB pages that is a TLB
miss per 4 KB read (37,000 a token for SmolLM2-135M in int8); on 2 MB pages, 512
times fewer, and SmolLM2's decode took 10-15% less time (benchmarks/huge_pages.py).
glibc and the kernel hand out 4 KB pages unless asked (THP "madvise", the usual default),
so after a backend has loaded its weights, `collapsed()` asks the kernel to collapse
the memory the load took (MADV_COLLAPSE, Linux 6.1+) into huge pages: for a backend,
in a thread at the lowest priority, which uses the cores the model leaves idle.

Best effort: where the kernel refuses, or there is no /proc (not Linux), nothing
changes but the speed; nor does it for weights that land in memory the process had
freed before (a long-lived process that dropped an earlier model), which is not new.
EDGEGEN_HUGE_PAGES=0 turns it off (a device short of memory: a collapse can fill a
2 MB page around a few touched 4 KB ones).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

MAPS = "/proc/self/maps"
ENV = "EDGEGEN_HUGE_PAGES"
HUGE = 2 << 20
MADV_COLLAPSE = 25


@dataclass
class Collapsed:
    moved: int = 0  # bytes the kernel moved to huge pages
    refused: set[str] = field(default_factory=set)  # why it kept the rest (errno names)
    done: threading.Event = field(default_factory=threading.Event)


@contextmanager
def collapsed(background: bool = False) -> Iterator[Collapsed]:
    """Collapse into huge pages the anonymous memory (the heap included) that any
    thread mapped while the block ran; what the process held before is left as it
    was. The result says how many bytes moved, and is `done` when all have.

    `background`: a thread does it after the block, so the first token does not wait
    for it (about 1 s per GB here; ctypes lets go of the GIL). The kernel swaps each
    2 MB page in whole while the model reads the others, as khugepaged does."""
    result = Collapsed()
    before = _anonymous_regions() if _wanted() else None
    yield result
    if before is None:
        result.done.set()
        return
    new = _without(_anonymous_regions(), before)
    if background:
        threading.Thread(target=_collapse_lowly, args=(new, result), daemon=True).start()
    else:
        _collapse_all(new, result)


def _collapse_lowly(ranges: list[tuple[int, int]], result: Collapsed) -> None:
    """`_collapse_all` at the lowest priority, on the cores the model leaves idle (Linux
    schedules each thread on its own)."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    _collapse_all(ranges, result)


def _collapse_all(ranges: list[tuple[int, int]], result: Collapsed) -> None:
    try:
        for start, end in ranges:
            _collapse(start, end, result)
    finally:
        result.done.set()


def _without(regions: set[tuple[int, int]], old: set[tuple[int, int]]) -> list[tuple[int, int]]:
    """The address ranges of `regions` that no region of `old` covered (a heap that
    grew: its new end). Mappings never overlap, so one sweep over both, sorted."""
    old_sorted, at, pieces = sorted(old), 0, []
    for start, end in sorted(regions):
        while at < len(old_sorted) and old_sorted[at][1] <= start:
            at += 1  # old regions wholly below this one
        covering = at
        while covering < len(old_sorted) and old_sorted[covering][0] < end:
            old_start, old_end = old_sorted[covering]
            if start < old_start:
                pieces.append((start, old_start))
            start = max(start, old_end)
            covering += 1
        if start < end:
            pieces.append((start, end))
    return pieces


def _wanted() -> bool:
    return os.environ.get(ENV, "1") != "0" and os.path.exists(MAPS)


def _anonymous_regions() -> set[tuple[int, int]]:
    """(start, end) of each private writable mapping backed by no file."""
    regions = set()
    try:
        with open(MAPS) as maps:
            for line in maps:
                fields = line.split()
                anonymous = len(fields) == 5 or (len(fields) == 6 and fields[5] == "[heap]")
                if anonymous and fields[1].startswith("rw"):
                    start, end = fields[0].split("-")
                    regions.add((int(start, 16), int(end, 16)))
    except OSError:
        pass
    return regions


def _collapse(start: int, end: int, result: Collapsed) -> None:
    """Each whole huge page inside [start, end), one at a time: a page the kernel
    refuses leaves the others, and the count stays exact."""
    madvise = _madvise()
    if madvise is None:
        return
    for page in range(-(-start // HUGE) * HUGE, end // HUGE * HUGE, HUGE):
        if madvise(page, HUGE, MADV_COLLAPSE) == 0:
            result.moved += HUGE
        else:
            result.refused.add(errno.errorcode.get(ctypes.get_errno(), "?"))


@functools.cache
def _madvise():
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise
