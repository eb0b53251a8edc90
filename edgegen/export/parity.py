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
    for check in [*step_grid(spec, run, tolerance), _check_decode(spec, run, tolerance)]:
        if not check["passed"]:
            raise ParityError(f"{artifact}: {check['message']}")
        checks.append({"case": check["case"], "max_abs_diff": check["max_abs_diff"]})
    return {
        "precision": precision,
        "tolerance": tolerance,
        "max_abs_diff": max(c["max_abs_diff"] for c in checks),
        "checks": checks,
        "passed": True,
    }


def step_grid(spec: StepSpec, run: Runner, tolerance: float) -> list[dict[str, Any]]:
    """One step on every shape of GRID: all outputs (logits and new state) vs eager."""
    checks = []
    for batch, seq, past in GRID:
        feeds = spec.example(batch, seq, past, seed=len(checks))
        with torch.no_grad():
            want = [t.numpy() for t in spec.module(*feeds.values())]
        case = f"step batch={batch} seq={seq} past={past}"
        checks.append(compare(case, spec.output_names, run(feeds), want, tolerance))
    return checks


def _check_decode(spec: StepSpec, run: Runner, tolerance: float) -> dict[str, Any]:
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
    return compare(case, ["logits"], [np.concatenate(logits, axis=1)], [want], tolerance)


_SEQ_INPUTS = {"input_ids", "position_ids"}


def compare(case, names, got, want, tolerance) -> dict[str, Any]:
    """Max absolute difference over outputs; a wrong shape or a NaN counts as infinite."""
    worst, worst_name = 0.0, names[0]
    for name, g, w in zip(names, got, want, strict=True):
        if g.shape != w.shape:
            worst, worst_name = float("inf"), f"{name} (shape {g.shape}, eager {w.shape})"
            break
        diff = float(np.abs(g.astype(np.float64) - w).max()) if g.size else 0.0
        if not np.isfinite(diff):
            diff = float("inf")
        if diff > worst:
            worst, worst_name = diff, name
    passed = worst <= tolerance
    message = f"{case}: {worst_name} differs from eager by {worst:.3g} (tolerance {tolerance:.0e})"
    return {"case": case, "max_abs_diff": worst, "passed": passed, "message": message}
