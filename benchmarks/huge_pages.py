"""Decode on 2 MB pages against 4 KB pages, in pairs run back to back.

    .venv/bin/python benchmarks/huge_pages.py BUNDLE [--precisions fp32,int8,int4] [--pairs 5]

Each measurement is a fresh process (EDGEGEN_HUGE_PAGES=1 or 0) that loads the ONNX
artifact with 1 thread and generates 64 greedy tokens after a 61-token prompt, twice;
it prints the median decode step of the second generation. The two modes alternate
which goes first, so a slow spell on a shared machine lands on both. Prints a Markdown
table: the median over the pairs of each mode, their ratio, and how many pairs the
huge pages won.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import numpy as np

ONE = """
import sys, numpy as np, edgegen.runtime
from edgegen.runtime.generator import Run
g = edgegen.runtime.load(sys.argv[1], "onnx", sys.argv[2], "cpu", 1)
g.runner.huge_pages.done.wait()  # the collapse runs in the background: steady figures
ids = list(range(100, 161))
for _ in range(2):
    run = Run(g, [ids], {"temperature": 0, "max_new_tokens": 64, "ignore_eos": True})
    for _ in run.steps():
        pass
print(float(np.median(run.decode_s)) * 1e3, g.runner.huge_pages.moved)
"""


def decode_ms(bundle: str, precision: str, huge: bool) -> tuple[float, int]:
    env = {**os.environ, "EDGEGEN_HUGE_PAGES": "1" if huge else "0"}
    command = [sys.executable, "-c", ONE, bundle, precision]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    ms, moved = out.splitlines()[-1].split()  # the script's own line, printed last
    return float(ms), int(moved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--precisions", default="fp32,int8,int4")
    parser.add_argument("--pairs", type=int, default=5)
    args = parser.parse_args()
    print("| precision | 2 MB pages ms | 4 KB pages ms | ratio | pairs won | moved MB |")
    print("|---|---|---|---|---|---|")
    for precision in args.precisions.split(","):
        huge, small, moved = [], [], 0
        for pair in range(args.pairs):
            for mode in (True, False) if pair % 2 == 0 else (False, True):
                ms, bytes_moved = decode_ms(args.bundle, precision, mode)
                (huge if mode else small).append(ms)
                moved = max(moved, bytes_moved)
        won = sum(h < s for h, s in zip(huge, small, strict=True))
        a, b = float(np.median(huge)), float(np.median(small))
        print(
            f"| {precision} | {a:.2f} | {b:.2f} | {a / b:.2f} | {won} of {args.pairs} "
            f"| {moved / 1e6:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
