"""Cold start: a fresh `edgegen generate` process, from launch to its first generated
text on stdout, and the peak resident memory of that process.

The child reports its own peak (VmHWM) on exit: `ru_maxrss` from wait4 would
carry the parent's pages across the fork.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import numpy as np

from edgegen.errors import BenchError

PROMPT = "The "
_CHILD = """
import atexit, sys
from edgegen.bench.worker import peak_rss_bytes
atexit.register(lambda: sys.stderr.write(f"\\nedgegen-peak-rss {peak_rss_bytes()}\\n"))
from edgegen.cli import main
main(sys.argv[1:], prog_name="edgegen")
"""


def cold_start(bundle: str, precision: str = "fp32", repeat: int = 5) -> dict[str, Any]:
    """Median first-token time and peak RSS of `repeat` fresh ONNX generate processes."""
    runs = [_one(bundle, precision) for _ in range(repeat)]
    return {
        "first_token_s": float(np.median([r[0] for r in runs])),
        "peak_rss_bytes": int(np.median([r[1] for r in runs])),
        "runs": [{"first_token_s": t, "peak_rss_bytes": m} for t, m in runs],
        "command": f"edgegen generate BUNDLE --prompt {PROMPT!r} --stream --max-new-tokens 1",
    }


def _one(bundle: str, precision: str) -> tuple[float, int]:
    args = ["generate", bundle, "--prompt", PROMPT, "--stream", "--max-new-tokens", "1"]
    args += ["--precision", precision, "--seed", "0", "--threads", "1"]
    start = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    seen = b""
    while len(seen) <= len(PROMPT):  # the prompt is echoed first
        byte = child.stdout.read(1)
        if not byte:
            break
        seen += byte
    first = time.perf_counter() - start
    _, stderr = child.communicate()
    peak = [line for line in stderr.decode(errors="replace").splitlines() if "peak-rss" in line]
    if child.returncode != 0 or len(seen) <= len(PROMPT) or not peak:
        message = stderr.decode(errors="replace").strip().splitlines()
        raise BenchError(f"cold start run failed: {message[0] if message else child.returncode}")
    return first, int(peak[-1].split()[-1])
