"""What the benchmark machine is, and how fast it reads memory (the roofline's floor)."""

from __future__ import annotations

import os
import platform
import time

import numpy as np

BANDWIDTH_BYTES = 256 * 1024 * 1024  # far larger than any cache


def machine_info(threads: int | None) -> dict:
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "threads": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def memory_read_bandwidth(nbytes: int = BANDWIDTH_BYTES, repeats: int = 5) -> float:
    """Bytes per second one thread reads, best of `repeats` sums over an array larger
    than the caches (a decode step reads every weight once, like this sum)."""
    data = np.ones(nbytes // 4, dtype=np.float32)
    data.sum()  # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
