"""One benchmark row, run in a process of its own so its memory is its own.

    python -m edgegen.bench.worker < row.json > figures.json

Only the eager row imports torch; an ONNX row measures the runtime as an app
would ship it.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from typing import Any

import numpy as np

from edgegen.errors import first_line

PASSAGE = (
    "Return a new list containing all items from the iterable in ascending order. "
    "A custom key function can be supplied to customize the sort order, and the "
    "reverse flag can be set to request the result in descending order. "
)


class TimedRunner:
    """Counts the time spent inside the model call, to tell it from the loop's own work."""

    def __init__(self, runner) -> None:
        self.runner, self.total, self.calls = runner, 0.0, 0

    def run(self, feeds):
        start = time.perf_counter()
        out = self.runner.run(feeds)
        self.total += time.perf_counter() - start
        self.calls += 1
        return out


SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.95}


def bench_prompts(tokenizer, batch: int, prompt_len: int) -> list[str]:
    """`batch` different prompts of `prompt_len` tokens each, BOS included when the model
    adds one, whatever the tokenizer (the longest piece of the passage that fits)."""
    want = prompt_len - int(tokenizer.add_bos)
    text = PASSAGE * (prompt_len // 8 + 2)  # no tokenizer packs more than 8 bytes a token
    prompts = []
    for row in range(batch):
        lo, hi = 1, len(text) - row  # the most characters that encode to <= want tokens
        while lo < hi:
            mid = (lo + hi + 1) // 2
            fits = len(tokenizer.encode(text[row : row + mid])) <= want
            lo, hi = (mid, hi) if fits else (lo, mid - 1)
        prompts.append(text[row : row + lo])
    return prompts


def load_generator(row: dict[str, Any]):
    if row["backend"] == "eager":
        import torch

        from edgegen.eager import load_eager

        if row["threads"]:
            torch.set_num_threads(row["threads"])
        return load_eager(row["checkpoint"], device=row["device"])
    import edgegen.runtime

    return edgegen.runtime.load(
        row["bundle"], row["backend"], row["precision"], row["device"], row["threads"]
    )


def measure(row: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    generator = load_generator(row)
    load_s = time.perf_counter() - start
    pages = getattr(generator.runner, "huge_pages", None)
    if pages is not None:  # steady figures: the weights on the pages they run from
        pages.done.wait()
    timed = generator.runner = TimedRunner(generator.runner)
    prompts = bench_prompts(generator.tokenizer, row["batch"], row["prompt_len"])
    params = dict(temperature=0, max_new_tokens=row["new_tokens"], ignore_eos=True)
    if row["sample"]:  # seeded, so every row still draws the same tokens
        params.update(SAMPLING, seed=0)
    for _ in range(row["warmup"]):
        generator.generate_batch(prompts, **params)
    runs = []
    for _ in range(row["repeat"]):
        timed.total, timed.calls = 0.0, 0
        start = time.perf_counter()
        results = generator.generate_batch(prompts, **params)
        wall = time.perf_counter() - start
        runs.append(
            {
                "wall_s": wall,
                "prefill_s": results[0].prefill_s,
                "decode_s": results[0].decode_s,
                "model_s": timed.total,
                "model_calls": timed.calls,
            }
        )
    long = [  # per position, the median over runs: one run is at the mercy of a noisy machine
        generator.generate(prompts[0], **{**params, "max_new_tokens": row["long_tokens"]}).decode_s
        for _ in range(row["long_repeat"])
    ]
    return {
        "load_s": load_s,
        "huge_page_bytes": pages.moved if pages is not None else 0,
        "runs": runs,
        "tokens": [r.token_ids for r in results],
        "long_decode_s": [float(t) for t in np.median(np.array(long), axis=0)],
        "peak_rss_bytes": peak_rss_bytes(),
        "torch_imported": "torch" in sys.modules,
    }


def peak_rss_bytes() -> int:
    """This process's peak resident memory. VmHWM, because ru_maxrss carries the parent's
    peak across fork and exec on Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    row = json.loads(sys.stdin.read())
    try:
        figures = measure(row)
    except Exception as e:  # reported by the parent as one line
        first = first_line(e)
        figures = {"error": f"{type(e).__name__}: {first}"}
    json.dump(figures, sys.stdout)


if __name__ == "__main__":
    main()
