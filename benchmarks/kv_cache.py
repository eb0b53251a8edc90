"""What the KV cache removes: the per-token latency, at a given position, of
pytorch/examples' TransformerModel run as written (every new token recomputes the
whole sequence) against the bundle from_module exports from it (one decode step
over the cached keys and values).

    python benchmarks/kv_cache.py [--position 500] [--layers 6] [--threads 1]

Weights are random: latency does not depend on them, and the export's parity gates
hold for any weights. Prints a Markdown table of median and p90 milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import edgegen.runtime
from edgegen.export import from_module
from edgegen.runtime.decoder import Decoder
from tests.user_models import TransformerModel


def timings(fn, setup, warmup: int, repeat: int) -> list[float]:
    """Seconds of `fn(setup())` per repetition; `setup` is not timed."""
    for _ in range(warmup):
        fn(setup())
    out = []
    for _ in range(repeat):
        arg = setup()
        start = time.perf_counter()
        fn(arg)
        out.append(time.perf_counter() - start)
    return out


def figures(seconds: list[float]) -> tuple[float, float]:
    ms = sorted(s * 1e3 for s in seconds)
    return statistics.median(ms), ms[min(len(ms) - 1, round(0.9 * (len(ms) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--position", type=int, default=500, help="tokens before the timed one")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ff", type=int, default=1024, help="feed-forward width")
    ap.add_argument("--vocab", type=int, default=10000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = TransformerModel(args.vocab, args.dim, args.heads, args.ff, args.layers).eval()
    words = [f"w{i}" for i in range(args.vocab - 1)] + ["<eos>"]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.position + 1,), generator=gen)

    def recompute(x):  # the module's only way to the next token: all positions again
        with torch.no_grad():
            model(x)

    rows = [("TransformerModel.forward, full recompute", ids[:, None], recompute)]
    bundle = Path(tempfile.mkdtemp()) / "bundle"
    from_module(model, words, bundle)
    prompt, last = ids[:-1].tolist(), ids[-1:].numpy()
    for backend in ("onnx", "torchscript"):
        runtime = edgegen.runtime.load(bundle, backend=backend, threads=args.threads)

        def prefilled(runtime=runtime):  # a fresh cache holding `position` tokens
            decoder = Decoder(runtime.runner, runtime.signature, runtime.tokenizer.pad_id)
            decoder.prefill([prompt])
            return decoder

        rows.append((f"bundle, {backend} decode step (KV cache)", prefilled, None))

    print(
        f"TransformerModel: {args.layers} layers, d_model {args.dim}, {args.heads} heads, "
        f"feed-forward {args.ff}, vocabulary {args.vocab}; the token at position "
        f"{args.position}, batch 1, {args.threads} thread(s), {args.warmup} warm-up and "
        f"{args.repeat} timed repetitions\n"
    )
    print("| path | median ms | p90 ms | vs full recompute |\n|---|---|---|---|")
    base = None
    for name, setup, fn in rows:
        if fn is None:
            seconds = timings(lambda d: d.decode_one_token(last), setup, args.warmup, args.repeat)
        else:
            seconds = timings(fn, lambda s=setup: s, args.warmup, args.repeat)
        median, p90 = figures(seconds)
        base = base or median
        print(f"| {name} | {median:.2f} | {p90:.2f} | {base / median:.1f}x |")


if __name__ == "__main__":
    main()
