"""The export parity gate: every artifact against eager PyTorch, before publishing.

1. One step on a grid of shapes (batch 1/3, seq 1/7, past 0/5; GPT rows after the
   first are left-padded; no GPT batch of several tokens after a past): every output
   (logits and new state) vs eager.
2. Prefill + decode through the runtime's own Decoder: a ragged batch is prefilled
   (left-padded and masked), then decoded token by token from the Decoder's state,
   its KV buffer growing past its first capacity on the way; every step's logits
   must match one forward of the original eager model over each row alone (which
   also proves the step module a family exports).

A check over its tolerance raises ParityError naming the artifact, the case and
the difference; nothing is published.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgegen.corpus import load_corpus
from edgegen.errors import ExportError, ParityError, TokenizerError
from edgegen.export.spec import StepSpec
from edgegen.runtime.backends import RUNNERS as RUNTIME_RUNNERS
from edgegen.runtime.decoder import Decoder, StepRunner, in_place_state

TOLERANCE = {"fp32": 1e-4}  # max difference on logits and state, per unit of their scale
# Quality on held-out text vs fp32 eager, per precision: max KL(eager || artifact) in
# nats/token, min top-1 agreement, max perplexity increase (relative). fp32 differs
# from eager only by float reassociation; the quantized gates are what a user can
# trust: a failing gate fails the command unless it is lowered explicitly.
QUALITY_GATES = {
    "fp32": {"kl": 1e-5, "top1": 0.999, "ppl_change": 1e-3},
    "fp16": {"kl": 1e-3, "top1": 0.99, "ppl_change": 0.005},
    "int8": {"kl": float("inf"), "top1": 0.95, "ppl_change": 0.02},
    "int4": {"kl": float("inf"), "top1": 0.0, "ppl_change": 0.08},
}
QUALITY_WINDOW, QUALITY_TOKENS = 64, 4096
CALIBRATION_ROWS = 32  # of QUALITY_WINDOW tokens
MAX_UNKNOWN = 0.1  # held-out text with more unknown tokens than this measures little
GRID = list(itertools.product((1, 3), (1, 7), (0, 5)))  # (batch, seq, past)
PROMPT_LEN, DECODE_STEPS = 7, 5  # the longest prompt of the decode check, and its steps
DECODE_CAPACITY = PROMPT_LEN + 1  # the Decoder's first buffer: decoding must grow it

Runner = Callable[[dict[str, torch.Tensor]], list[np.ndarray]]


def artifact_runner(
    fmt: str, path: Path, spec: StepSpec, device: str = "cpu", session_config=None
) -> Runner:
    """The runtime's own backend for the artifact, opened as the runtime opens it, so the
    gate checks what users run."""
    runner = RUNTIME_RUNNERS[fmt](
        path, spec.input_names, device, None, session_config, in_place_state(spec.signature())
    )
    return lambda feeds: runner.run({name: t.numpy() for name, t in feeds.items()})


def check_parity(
    spec: StepSpec, run: Runner, artifact: str, precision: str = "fp32"
) -> dict[str, Any]:
    """The artifact's parity report; raises ParityError on the first failing check."""
    tolerance = TOLERANCE[precision]
    checks = []
    decode = check_decode(spec, _NumpyFeeds(run), tolerance)
    for check in [*step_grid(spec, run, tolerance), decode]:
        if not check["passed"]:
            raise ParityError(f"{artifact}: {check['message']}")
        checks.append({k: check[k] for k in ("case", "max_abs_diff", "relative")})
    return {
        "precision": precision,
        "tolerance": tolerance,
        "max_abs_diff": max(c["max_abs_diff"] for c in checks),
        "relative": max(c["relative"] for c in checks),
        "checks": checks,
        "passed": True,
    }


def step_grid(spec: StepSpec, run: Runner, tolerance: float) -> list[dict[str, Any]]:
    """One step on every shape of GRID: all outputs (logits and new state) vs eager. A
    GPT's several-token step after a past is one row (see spec), and its buffers are
    compared over the real slots."""
    checks = []
    for batch, seq, past in grid(spec):
        feeds = spec.example(batch, seq, past, seed=len(checks))
        with torch.no_grad():  # the GPT step writes its buffers: eager gets copies
            want = [t.numpy() for t in spec.module(*(t.clone() for t in feeds.values()))]
        got = run(feeds)
        if spec.is_gpt:
            got, want = (real_slots(x, feeds["attention_mask"].numpy()) for x in (got, want))
        case = f"step batch={batch} seq={seq} past={past}"
        checks.append(compare(case, spec.output_names, got, want, tolerance))
    return checks


def real_slots(outputs: list[np.ndarray], mask: np.ndarray) -> list[np.ndarray]:
    """A GPT step's outputs with each KV buffer cut to the slots the mask covers and
    zero where it marks padding: what the contract specifies (see spec)."""
    real = mask[:, None, :, None].astype(np.float32)
    return [a[:, :, : mask.shape[1]] * real if a.ndim == 4 else a for a in outputs]


def grid(spec: StepSpec) -> list[tuple[int, int, int]]:
    """GRID's (batch, seq, past) shapes the spec's step takes: all but, for a GPT, a
    batch of several tokens after a past (see spec)."""
    return [(b, s, p) for b, s, p in GRID if not (spec.is_gpt and b > 1 and s > 1 and p)]


class _NumpyFeeds:
    """A Runner as the Decoder drives one: numpy feeds in."""

    def __init__(self, run: Runner) -> None:
        self.run_torch = run

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.run_torch({name: torch.from_numpy(v) for name, v in feeds.items()})


def check_decode(
    spec: StepSpec,
    runner: StepRunner,
    tolerance: float,
    signature: dict[str, Any] | None = None,
    steps: int = DECODE_STEPS,
) -> dict[str, Any]:
    """The runtime's Decoder over `runner` (with `signature`, default the spec's) prefills
    two ragged prompts and decodes `steps` tokens from its own state, its KV buffer
    starting at DECODE_CAPACITY slots; the logits after each token must equal one forward
    of the original model over each row alone."""
    gen = torch.Generator().manual_seed(99)
    lengths = (PROMPT_LEN, PROMPT_LEN - 4)
    rows = [torch.randint(0, spec.example_vocab, (1, n + steps), generator=gen) for n in lengths]
    decoder = Decoder(runner, signature or spec.signature(), 0, capacity=DECODE_CAPACITY)
    got = [decoder.prefill([row[0, :n].tolist() for row, n in zip(rows, lengths, strict=True)])]
    first = decoder.capacity
    for t in range(steps):
        tokens = np.array([int(row[0, n + t]) for row, n in zip(rows, lengths, strict=True)])
        got.append(decoder.decode_one_token(tokens))
    want = [
        spec.model_logits(spec.prefill_feeds(row))[0, n - 1 :].numpy()
        for row, n in zip(rows, lengths, strict=True)
    ]
    case = f"prefill {'/'.join(map(str, lengths))} + decode {steps} vs full forward"
    if decoder.kv_cache:
        case += f" (KV buffer {first} -> {decoder.capacity} slots)"
    return compare(case, ["logits"], [np.stack(got, axis=1)], [np.stack(want)], tolerance)


def compare(case, names, got, want, tolerance) -> dict[str, Any]:
    """Max absolute difference over outputs, measured against the tolerance times the
    outputs' scale (max |eager|, at least 1): float rounding grows with the magnitude of
    what is computed, so a deep model with logits near 30 is held to 30x the absolute
    tolerance of one whose logits stay below 1. A wrong shape or a NaN is infinite."""
    worst, worst_name, worst_ratio = 0.0, names[0], 0.0
    for name, g, w in zip(names, got, want, strict=True):
        if g.shape != w.shape:
            worst, worst_name = float("inf"), f"{name} (shape {g.shape}, eager {w.shape})"
            worst_ratio = worst
            break
        diff = float(np.abs(g.astype(np.float64) - w).max()) if g.size else 0.0
        diff = diff if np.isfinite(diff) else float("inf")
        finite = np.abs(w[np.isfinite(w)])  # an infinite reference must not excuse anything
        scale = max(1.0, float(finite.max())) if finite.size else 1.0
        if diff / scale > worst_ratio:
            worst, worst_name, worst_ratio = diff, name, diff / scale
    passed = worst_ratio <= tolerance
    message = (
        f"{case}: {worst_name} differs from eager by {worst:.3g} "
        f"({worst_ratio:.3g} of its scale; tolerance {tolerance:.0e})"
    )
    return {
        "case": case,
        "max_abs_diff": worst,
        "relative": worst_ratio,
        "passed": passed,
        "message": message,
    }


def eval_windows(tokenizer, eval_text, spec: StepSpec) -> torch.Tensor:
    """Held-out text as rows of QUALITY_WINDOW + 1 tokens, QUALITY_TOKENS in all: a
    given file whole, else the embedded corpus's validation split. Text the tokenizer
    cannot encode, or mostly cannot (a word vocabulary's <unk> for over MAX_UNKNOWN of
    its tokens), would measure nothing: an ExportError asks for other text."""
    corpus = load_corpus(eval_text)
    docs = corpus.val if eval_text is None else corpus.train + corpus.val
    stream = _encoded(tokenizer, docs, eval_text)
    window = _window(spec)
    rows = min(len(stream) // (window + 1), QUALITY_TOKENS // window)
    if rows < 1:
        raise ExportError(f"evaluation text is too short: it needs at least {window + 1} tokens")
    return torch.from_numpy(stream[: rows * (window + 1)].reshape(rows, window + 1))


def calibration_windows(tokenizer, spec: StepSpec) -> torch.Tensor | None:
    """CALIBRATION_ROWS windows of the embedded corpus's training split, which the
    quality gates never read, to measure activations on; None when the tokenizer cannot
    encode that text (a word vocabulary of other text)."""
    window = _window(spec)
    docs, chars = [], 0
    for doc in load_corpus(None).train:  # enough for the rows (no tokenizer packs 8 bytes)
        docs.append(doc)
        chars += len(doc)
        if chars >= 8 * window * CALIBRATION_ROWS:
            break
    try:
        stream = _encoded(tokenizer, docs, None)
    except ExportError:
        return None
    rows = min(len(stream) // window, CALIBRATION_ROWS)
    if rows < 1:
        return None
    return torch.from_numpy(stream[: rows * window].reshape(rows, window))


def _window(spec: StepSpec) -> int:
    """Tokens a row of held-out or calibration text feeds: QUALITY_WINDOW, or less for a
    shorter context."""
    return min(QUALITY_WINDOW, spec.layout.get("max_seq_len") or QUALITY_WINDOW)


def _encoded(tokenizer, docs: list[str], eval_text) -> np.ndarray:
    what = "the embedded corpus" if eval_text is None else f"evaluation text {eval_text}"
    ask = "give held-out text in the model's vocabulary with --eval-text"
    try:
        ids = [np.array(tokenizer.encode(d, bos=True, eos=True)) for d in docs]
    except TokenizerError as e:
        raise ExportError(f"{what} does not fit this tokenizer ({e}); {ask}") from None
    stream = np.concatenate(ids)
    unknown = float(np.mean(stream == tokenizer.unk_id)) if tokenizer.unk_id is not None else 0
    if unknown > MAX_UNKNOWN:
        raise ExportError(f"{what} is {unknown:.0%} unknown tokens to this tokenizer; {ask}")
    return stream


def quality_figures(spec: StepSpec, run: Runner, windows: torch.Tensor) -> dict[str, float]:
    """KL(eager || artifact), top-1 agreement and perplexity change on held-out windows."""
    kl, agree, nll_eager, nll_artifact, count = 0.0, 0, 0.0, 0.0, 0
    for chunk in windows.split(8):
        feeds = spec.prefill_feeds(chunk[:, :-1])
        with torch.no_grad():
            want = torch.log_softmax(spec.module(*feeds.values())[0].double(), dim=-1)
        got = torch.log_softmax(torch.from_numpy(run(feeds)[0]).double(), dim=-1)
        targets = chunk[:, 1:, None]
        kl += float((want.exp() * (want - got)).sum())
        agree += int((want.argmax(-1) == got.argmax(-1)).sum())
        nll_eager -= float(want.gather(-1, targets).sum())
        nll_artifact -= float(got.gather(-1, targets).sum())
        count += targets.numel()
    return {
        "kl": kl / count,
        "top1": agree / count,
        "ppl_change": float(np.expm1((nll_artifact - nll_eager) / count)),
        "ppl_eager": float(np.exp(nll_eager / count)),
        "tokens": count,
    }


def gate_for(
    precision: str, changes: dict[str, dict[str, float]] | None = None
) -> dict[str, float]:
    """QUALITY_GATES[precision] with any fields the caller changed."""
    return {**QUALITY_GATES[precision], **(changes or {}).get(precision, {})}


def passes_gate(figures: dict[str, float], gate: dict[str, float]) -> bool:
    """Perplexity may not rise by more than the gate (a fall is fine)."""
    return (
        figures["kl"] <= gate["kl"]
        and figures["top1"] >= gate["top1"]
        and figures["ppl_change"] <= gate["ppl_change"]
    )


def describe_gate(gate: dict[str, float]) -> str:
    parts = [f"ppl<=+{gate['ppl_change']:.1%}"]
    if gate["top1"] > 0:
        parts.insert(0, f"top-1>={gate['top1']:.1%}")
    if np.isfinite(gate["kl"]):
        parts.insert(0, f"KL<={gate['kl']:.0e}")
    return ", ".join(parts)
