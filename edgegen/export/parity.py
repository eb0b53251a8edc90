"""The export parity gate: every artifact against eager PyTorch, before publishing.

1. One step on a grid of shapes (batch 1/3, seq 1/7, past 0/5; GPT rows after the
   first are left-padded): every output (logits and new state) vs eager.
2. Prefill + decode: the artifact prefills a prompt, then decodes token by token
   from its own state; its logits must match one eager forward over the sequence.

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

from edgegen.errors import ParityError
from edgegen.export.spec import StepSpec
from edgegen.runtime.backends import RUNNERS as RUNTIME_RUNNERS

TOLERANCE = {"fp32": 1e-4}  # max absolute difference on logits and state
GRID = list(itertools.product((1, 3), (1, 7), (0, 5)))  # (batch, seq, past)
PROMPT_LEN, DECODE_STEPS = 7, 5

Runner = Callable[[dict[str, torch.Tensor]], list[np.ndarray]]


def artifact_runner(fmt: str, path: Path, spec: StepSpec) -> Runner:
    """The runtime's own backend for the artifact, so the gate checks what users run."""
    runner = RUNTIME_RUNNERS[fmt](path, spec.input_names)
    return lambda feeds: runner.run({name: t.numpy() for name, t in feeds.items()})


def check_parity(
    spec: StepSpec, run: Runner, artifact: str, precision: str = "fp32"
) -> dict[str, Any]:
    """The artifact's parity report; raises ParityError on the first failing check."""
    tolerance = TOLERANCE[precision]
    checks = []
    for batch, seq, past in GRID:
        feeds = spec.example(batch, seq, past, seed=len(checks))
        with torch.no_grad():
            want = [t.numpy() for t in spec.module(*feeds.values())]
        got = run(feeds)
        case = f"step batch={batch} seq={seq} past={past}"
        checks.append(_compare(artifact, case, spec.output_names, got, want, tolerance))
    checks.append(_check_decode(spec, run, artifact, tolerance))
    return {
        "precision": precision,
        "tolerance": tolerance,
        "max_abs_diff": max(c["max_abs_diff"] for c in checks),
        "checks": checks,
        "passed": True,
    }


def _check_decode(spec: StepSpec, run: Runner, artifact: str, tolerance: float) -> dict[str, Any]:
    """Prefill PROMPT_LEN tokens, decode DECODE_STEPS more from the artifact's own state."""
    total = PROMPT_LEN + DECODE_STEPS
    full = spec.example(batch=2, seq=total, past=0, seed=99)
    with torch.no_grad():
        want = spec.module(*full.values())[0].numpy()
    ids = full["input_ids"]
    feeds = {k: (v[:, :PROMPT_LEN] if k in _SEQ_INPUTS else v) for k, v in full.items()}
    if "attention_mask" in feeds:
        feeds["attention_mask"] = full["attention_mask"][:, :PROMPT_LEN]
    outputs = run(feeds)
    logits = [outputs[0]]
    for t in range(PROMPT_LEN, total):
        feeds = spec.advance(feeds, outputs, ids[:, t])
        outputs = run(feeds)
        logits.append(outputs[0])
    case = f"prefill {PROMPT_LEN} + decode {DECODE_STEPS} vs full forward"
    return _compare(artifact, case, ["logits"], [np.concatenate(logits, axis=1)], [want], tolerance)


_SEQ_INPUTS = {"input_ids", "position_ids"}


def _compare(artifact, case, names, got, want, tolerance) -> dict[str, Any]:
    worst, worst_name = 0.0, names[0]
    for name, g, w in zip(names, got, want, strict=True):
        if g.shape != w.shape:
            raise ParityError(
                f"{artifact}: {case}: {name} has shape {g.shape}, eager gives {w.shape}"
            )
        diff = float(np.abs(g.astype(np.float64) - w).max()) if g.size else 0.0
        if not np.isfinite(diff):
            diff = float("inf")
        if diff > worst:
            worst, worst_name = diff, name
    if worst > tolerance:
        raise ParityError(
            f"{artifact}: {case}: {worst_name} differs from eager by {worst:.3g} "
            f"(tolerance {tolerance:.0e})"
        )
    return {"case": case, "max_abs_diff": worst}
