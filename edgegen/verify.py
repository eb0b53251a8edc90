"""Layered parity of a bundle against its checkpoint (eager PyTorch is the oracle).

    1 step      one step on the shape grid: every output vs eager (max abs diff)
    2 cache     the runtime's Decoder: ragged prefill + decode steps, growing its KV
                buffer, vs one full forward per row (the export gate's check)
    3 greedy    the runtime's greedy continuation == eager's, for N tokens per prompt
    4 quality   next-token distributions on held-out text vs fp32 eager: KL divergence,
                top-1 agreement, perplexity change (the gate quantized artifacts must pass)
    5 sampling  the same seed gives the same tokens on every fp32 backend
    6 files     the manifest validates, every artifact matches its sha256, and so does the
                tokenizer file, which also parses and fits the model's vocabulary

Every level reports a figure and its tolerance; any failure fails the report. A check
that cannot run here (fp16 without a CUDA GPU; level 4 on the embedded corpus when the
model's vocabulary does not cover it) is skipped: counted apart, never as a pass.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgegen.checkpoint import load_checkpoint
from edgegen.eager import eager_generator
from edgegen.errors import EdgegenError, ExportError, TokenizerError, VerifyError, first_line
from edgegen.export.parity import (
    TOLERANCE,
    artifact_runner,
    check_decode,
    describe_gate,
    eval_windows,
    gate_for,
    passes_gate,
    quality_figures,
    step_grid,
)
from edgegen.export.spec import step_spec
from edgegen.runtime import open_artifact
from edgegen.runtime.backends import cuda_provider_available
from edgegen.runtime.generator import Generator
from edgegen.runtime.manifest import Manifest, read_manifest, verify_artifact

LEVELS = {1: "step", 2: "cache", 3: "greedy", 4: "quality", 5: "sampling", 6: "files"}
PROMPTS = ("Return the ", "The", "If a list of values is given, ")
SEED = 1234


@dataclass
class Check:
    level: int
    artifact: str  # a file of the bundle, or "all"
    figure: str  # what was measured
    tolerance: str
    passed: bool
    detail: str = ""
    skipped: bool = False  # it could not run here (then passed is False); `figure` says why

    @property
    def name(self) -> str:
        return LEVELS[self.level]

    @property
    def result(self) -> str:
        return "skipped" if self.skipped else "passed" if self.passed else "failed"


def skipped_check(level: int, artifact: str, reason: str) -> Check:
    return Check(level, artifact, f"skipped: {reason}", "-", False, skipped=True)


@dataclass
class VerifyReport:
    bundle: str
    checkpoint: str
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Every check ran and passed (a skipped check is not a pass)."""
        return all(c.passed for c in self.checks)

    @property
    def failed(self) -> bool:
        return self.counts()["failed"] > 0

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(("passed", "skipped", "failed"), 0)
        for c in self.checks:
            counts[c.result] += 1
        return counts

    def summary(self) -> str:
        """One line: N passed, N skipped, N failed."""
        return ", ".join(f"{n} {result}" for result, n in self.counts().items())

    def to_dict(self) -> dict[str, Any]:
        return {
            "bundle": self.bundle,
            "checkpoint": self.checkpoint,
            "passed": self.passed,
            "counts": self.counts(),
            "checks": [{**asdict(c), "name": c.name, "result": c.result} for c in self.checks],
        }

    def table(self) -> str:
        rows = [("level", "artifact", "measured", "tolerance", "result")]
        for c in self.checks:
            result = "pass" if c.passed else "skipped" if c.skipped else f"FAIL {c.detail}".strip()
            rows.append((f"{c.level} {c.name}", c.artifact, c.figure, c.tolerance, result))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4] for r in rows]
        return "\n".join([*lines, self.summary()])


def verify_bundle(
    bundle: str | Path,
    checkpoint: str | Path,
    levels: tuple[int, ...] = tuple(LEVELS),
    tokens: int = 128,
    prompts: tuple[str, ...] | None = None,
    eval_text: str | Path | None = None,
    quality_gates: dict[str, dict[str, float]] | None = None,
) -> VerifyReport:
    """Run the chosen levels. Levels 3 and 5 continue `prompts` (default: PROMPTS, or
    words of the model's own vocabulary where it cannot encode those). Level 4 reads
    `eval_text` (default: the embedded corpus's validation split, skipped when the
    model's vocabulary does not cover it) and applies QUALITY_GATES, updated by
    `quality_gates`."""
    unknown = [lv for lv in levels if lv not in LEVELS]
    if unknown:
        raise VerifyError(f"unknown level(s) {unknown}; levels are 1-6: {LEVELS}")
    if tokens < 1:
        raise VerifyError(f"tokens must be positive, got {tokens}")
    report = VerifyReport(str(bundle), str(checkpoint))
    # files are hashed once: by level 6 when asked for, else here
    manifest = read_manifest(bundle, verify_hashes=6 not in levels)
    if 6 in levels:
        report.checks += check_files(manifest)
        if report.failed:
            return report  # the other levels would load damaged files
    model, tokenizer = load_checkpoint(checkpoint)
    if model.config != manifest.config:
        raise VerifyError(
            f"checkpoint {checkpoint} is not the model in bundle {bundle} (configs differ)"
        )
    spec = step_spec(model)
    prompts = prompts or prompts_for(tokenizer)
    fp32 = [a for a in manifest.artifacts if a.precision == "fp32"]
    eager = eager_generator(model, tokenizer)
    generators = {a.path: open_artifact(manifest, a.format, a.precision) for a in fp32}
    # levels 1 and 4 run each artifact through a backend of their own, apart from the
    # generators (levels 2, 3, 5), so a fault in the loop cannot hide in both
    runners = {
        a.path: artifact_runner(a.format, manifest.path_of(a), spec, "cpu", a.session_config)
        for a in fp32
    }
    for artifact in fp32:
        tolerance = TOLERANCE[artifact.precision]
        name = artifact.path
        gen, run = generators[name], runners[name]
        if 1 in levels:
            report.checks.append(guarded(1, name, check_steps, spec, run, name, tolerance))
        if 2 in levels:
            report.checks.append(guarded(2, name, check_cache, spec, gen, name, tolerance))
        if 3 in levels:
            report.checks.append(guarded(3, name, check_greedy, eager, gen, name, prompts, tokens))
    if 4 in levels:
        report.checks += quality_checks(
            manifest, spec, tokenizer, eval_text, quality_gates, runners
        )
    if 5 in levels:
        everyone = {"eager": eager, **generators}
        report.checks.append(guarded(5, "all", check_sampling, everyone, prompts, tokens))
    return report


def prompts_for(tokenizer) -> tuple[str, ...]:
    """PROMPTS, or where the tokenizer cannot encode one of them or encodes one with an
    unknown token (a word vocabulary), three of 3, 1 and 7 of its own tokens, drawn with
    SEED."""
    try:
        if all(tokenizer.unk_id not in tokenizer.encode(p) for p in PROMPTS):
            return PROMPTS
    except TokenizerError:
        pass
    # tokens that stand for text and decode to what encodes back to them alone
    words = [
        i
        for i in range(tokenizer.tokenizer_size)
        if i not in tokenizer.special_ids
        and i != tokenizer.unk_id
        and _encodes_to(tokenizer, tokenizer.decode([i]), [i])
    ]
    rng = random.Random(SEED)
    prompts = []
    for length in (3, 1, 7):
        ids = rng.choices(words, k=length) if words else []
        if not ids or not _encodes_to(tokenizer, tokenizer.decode(ids), ids):
            raise VerifyError("cannot make prompts from this tokenizer's vocabulary")
        prompts.append(tokenizer.decode(ids))
    return tuple(prompts)


def _encodes_to(tokenizer, text: str, ids: list[int]) -> bool:
    try:
        return bool(text.strip()) and tokenizer.encode(text) == ids
    except TokenizerError:
        return False


def guarded(level: int, artifact: str, check, *args) -> Check:
    """A check that crashes (a broken artifact, a runtime error) fails; it does not abort."""
    try:
        return check(*args)
    except Exception as e:
        message = first_line(e)
        return Check(level, artifact, "error", "-", False, f"{type(e).__name__}: {message}"[:300])


def quality_checks(manifest, spec, tokenizer, eval_text, quality_gates, runners) -> list[Check]:
    """Level 4 for every artifact (`runners`: those open already); skipped when the
    default held-out text does not fit the tokenizer, an error when given text does not."""
    try:
        windows = eval_windows(tokenizer, eval_text, spec)
    except ExportError as e:
        if eval_text is not None:
            raise VerifyError(str(e)) from None
        return [skipped_check(4, a.path, str(e)) for a in manifest.artifacts]
    checks = []
    for artifact in manifest.artifacts:
        gate = gate_for(artifact.precision, quality_gates)
        run = runners.get(artifact.path)
        checks.append(check_artifact_quality(manifest, artifact, spec, gate, windows, run))
    return checks


def check_artifact_quality(manifest, artifact, spec, gate, windows, run=None) -> Check:
    """Level 4 for one artifact (opened here unless `run` is given); fp16 runs on a CUDA
    GPU or is skipped."""
    device = "cuda" if artifact.precision == "fp16" else "cpu"
    if device == "cuda" and not cuda_provider_available():
        return skipped_check(4, artifact.path, "fp16 runs on a CUDA GPU, none here")
    if run is None:
        path = manifest.path_of(artifact)
        run = guarded(
            4,
            artifact.path,
            artifact_runner,
            artifact.format,
            path,
            spec,
            device,
            artifact.session_config,
        )
        if isinstance(run, Check):
            return run
    return guarded(4, artifact.path, check_quality, spec, run, artifact.path, gate, windows)


def check_quality(spec, run, artifact: str, gate: dict[str, float], windows) -> Check:
    figures = quality_figures(spec, run, windows)
    figure = (
        f"KL {figures['kl']:.1e}, top-1 {figures['top1']:.2%}, "
        f"ppl {figures['ppl_change']:+.3%} ({figures['tokens']} tokens)"
    )
    return Check(4, artifact, figure, describe_gate(gate), passes_gate(figures, gate))


def check_files(manifest: Manifest) -> list[Check]:
    checks = []
    for artifact in manifest.artifacts:
        try:
            verify_artifact(manifest, artifact)
            checks.append(Check(6, artifact.path, "sha256 matches", "exact", True))
        except EdgegenError as e:
            checks.append(Check(6, artifact.path, "sha256 differs", "exact", False, str(e)))
    return [*checks, check_tokenizer_file(manifest)]


def check_tokenizer_file(manifest: Manifest) -> Check:
    name = manifest.data["tokenizer"]["file"]
    try:
        _ = manifest.tokenizer  # reading it checks its hash, then that it parses and fits
    except EdgegenError as e:
        return Check(6, name, "damaged", "exact", False, str(e))
    return Check(6, name, "sha256 matches, parses", "exact", True)


def check_steps(spec, run, artifact: str, tolerance: float) -> Check:
    results = step_grid(spec, run, tolerance)
    worst = max(results, key=lambda r: r["relative"])
    failed = [r for r in results if not r["passed"]]
    detail = failed[0]["message"] if failed else ""
    figure = (
        f"max |diff| {worst['max_abs_diff']:.2e} ({worst['relative']:.1e} of scale) "
        f"over {len(results)} shapes"
    )
    return Check(1, artifact, figure, f"{tolerance:.0e}", not failed, detail)


def check_cache(spec, generator: Generator, artifact: str, tolerance: float) -> Check:
    """The export gate's decode check (`parity.check_decode`) through the runtime's Decoder
    over the generator's own backend and manifest signature."""
    result = check_decode(spec, generator.runner, tolerance, generator.signature)
    figure = f"max |diff| {result['max_abs_diff']:.2e} ({result['relative']:.1e} of scale)"
    detail = "" if result["passed"] else result["message"]
    return Check(2, artifact, figure, f"{tolerance:.0e}", result["passed"], detail)


def check_greedy(
    eager: Generator, generator: Generator, artifact: str, prompts, tokens: int
) -> Check:
    params = dict(temperature=0, max_new_tokens=_room([eager, generator], prompts, tokens))
    params["ignore_eos"] = True
    want = [r.token_ids for r in (eager.generate(p, **params) for p in prompts)]
    got = [r.token_ids for r in (generator.generate(p, **params) for p in prompts)]
    for i, (w, g) in enumerate(zip(want, got, strict=True)):
        if w != g:
            at = next(
                (k for k, (a, b) in enumerate(zip(w, g, strict=False)) if a != b),
                min(len(w), len(g)),
            )
            figure = f"diverges at token {at} of prompt {i + 1}"
            return Check(3, artifact, figure, "identical", False, f"prompt {prompts[i]!r}")
    return Check(
        3,
        artifact,
        f"{len(prompts)} x {params['max_new_tokens']} tokens identical",
        "identical",
        True,
    )


def check_sampling(generators: dict[str, Generator], prompts, tokens: int) -> Check:
    params = dict(temperature=1.0, top_k=40, top_p=0.95, seed=SEED, ignore_eos=True)
    params["max_new_tokens"] = _room(list(generators.values()), prompts, min(tokens, 64))
    runs = {
        name: [g.generate(p, **params).token_ids for p in prompts] for name, g in generators.items()
    }
    reference = runs.pop("eager") if "eager" in runs else runs.pop(next(iter(runs)))
    differ = [name for name, ids in runs.items() if ids != reference]
    names = ", ".join(generators)
    if differ:
        return Check(
            5,
            "all",
            f"seed {SEED}: {', '.join(differ)} differ",
            "identical",
            False,
            f"backends: {names}",
        )
    return Check(5, "all", f"seed {SEED}: identical on {names}", "identical", True)


def _room(generators: list[Generator], prompts, tokens: int) -> int:
    """`tokens`, or fewer when the longest prompt leaves less context in any generator."""
    for g in generators:
        if g.context is not None:
            longest = max(len(g.encode_prompt(p)) for p in prompts)
            tokens = max(1, min(tokens, g.context - longest))
    return tokens


def write_report(report: VerifyReport, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
