"""What the benchmark machine is, and how fast it reads memory (the roofline's floor)."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np

BANDWIDTH_BYTES = 256 * 1024 * 1024  # far larger than any cache
# One MatMul node, x[1,k] @ w[k,n], with w a graph input: ONNX Runtime then runs its
# matrix-vector kernel on w where it lies, as a decode step runs on each weight.
MATVEC_MODEL = Path(__file__).with_name("matvec.onnx")


def machine_info(threads: int | None) -> dict:
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "threads": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def memory_read_bandwidth(
    threads: int | None = None, nbytes: int = BANDWIDTH_BYTES, repeats: int = 7
) -> float:
    """Bytes per second a decode step can read: the best of `repeats` fp32
    matrix-vector products over a matrix far larger than the caches, run by ONNX
    Runtime with the bench's thread count. A decode step reads every weight once in
    such products; a numpy sum reads at about half this speed and would flatter
    every "x floor" figure by as much."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(MATVEC_MODEL), options, providers=["CPUExecutionProvider"])
    side = int((nbytes // 4) ** 0.5)
    feeds = {
        "x": np.ones((1, side), dtype=np.float32),
        "w": np.full((side, side), 0.5, dtype=np.float32),  # pages faulted in here
    }
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feeds)
        best = min(best, time.perf_counter() - start)
    return feeds["w"].nbytes / best


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
