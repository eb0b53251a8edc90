"""Training throughput in 1 and 2 processes: tokens per second of `edgegen train --nproc N`.

    .venv/bin/python benchmarks/train_throughput.py --family gpt --preset small --repeat 3

Each repetition is a fresh run of --steps optimizer steps on the CPU; its first --warmup
steps are dropped (start-up, first allocations), and the others give the run's figure:
the harmonic mean of their tokens/s (their tokens over their time, since each step of a
GPT has the same tokens), as rank 0 times a step (every process's share and the
exchange of gradients). Prints a Markdown table: the median and range
over the repetitions, and the median's ratio to one process. `--nproc` launches the
processes as torchrun would, with the cores divided among them (OMP_NUM_THREADS).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run_once(args, nproc: int, out: Path) -> float:
    command = [sys.executable, "-m", "edgegen", "train", "--family", args.family]
    command += ["--preset", args.preset, "--steps", str(args.steps), "--nproc", str(nproc)]
    command += ["--batch-size", str(args.batch_size), "--device", "cpu", "--quiet"]
    command += ["--eval-interval", str(10 * args.steps), "--eval-tokens", "512"]
    command += ["--out", str(out), "--force"]
    command += ["--seq-len", str(args.seq_len)] if args.family == "gpt" else []
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    steps = json.loads((out / "train_log.json").read_text())["train"][args.warmup :]
    # tokens over time for steps of equal tokens (a GPT's); an RNN's chunks vary a little
    return statistics.harmonic_mean([s["tokens_per_s"] for s in steps])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="gpt", choices=["gpt", "rnn"])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--nprocs", default="1,2")
    args = parser.parse_args()
    counts = [int(n) for n in args.nprocs.split(",")]
    figures: dict[int, list[float]] = {n: [] for n in counts}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):  # interleaved, so drifts in load touch every count
            for n in counts:
                figures[n].append(run_once(args, n, Path(tmp) / f"run-{n}"))
    print(
        f"{args.family} {args.preset}, batch {args.batch_size}, {os.cpu_count()} cores, "
        f"{args.steps} steps ({args.warmup} warm-up), {args.repeat} runs each\n"
    )
    print("| processes | tokens/s (median) | range | vs 1 process |")
    print("|---|---|---|---|")
    base = statistics.median(figures[counts[0]])
    for n in counts:
        median = statistics.median(figures[n])
        low, high = min(figures[n]), max(figures[n])
        print(f"| {n} | {median:,.0f} | {low:,.0f} - {high:,.0f} | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
