"""Latency, memory and size benchmark across backends and precisions, with a roofline.

Protocol: each row (backend x precision) runs in its own process: load, `warmup`
generations, then `repeat` timed ones, all greedy over the same prompts, so every
row does the same work (the report says whether they produced the same tokens).
The first token (prefill) is timed apart from the decode steps. Long generations
(`long_repeat`, their median per position) give decode latency per position.
Ratios are computed between rows of the same run. The machine's memory read
bandwidth is measured in the same run: the floor of a decode step is the bytes of
weights it reads over that bandwidth.

A row asked for that cannot run here (no checkpoint for eager, no such artifact in
the bundle, fp16 or CUDA without a CUDA GPU) is reported as skipped, with the
reason, apart from the rows measured.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

import edgegen
from edgegen.bench.cold import cold_start
from edgegen.bench.machine import machine_info, memory_read_bandwidth
from edgegen.errors import BenchError
from edgegen.progress import ProgressLine
from edgegen.runtime.manifest import read_manifest

BACKENDS = ("eager", "torchscript", "onnx")


@dataclass
class BenchOptions:
    bundle: str
    checkpoint: str | None = None  # needed for the eager row (the baseline)
    backends: tuple[str, ...] = BACKENDS
    precisions: tuple[str, ...] = ("fp32",)
    device: str = "cpu"
    batch: int = 1
    prompt_len: int = 32
    new_tokens: int = 64
    threads: int | None = 1
    warmup: int = 2
    repeat: int = 5
    long_tokens: int = 1000  # the per-position run; fewer if the context ends first
    long_repeat: int = 3  # per-position latency is the median over this many long runs
    cold_repeat: int = 5  # fresh `edgegen generate` processes timed (ONNX fp32); 0: none
    sample: bool = False  # seeded top-k + top-p sampling instead of greedy

    def validate(self) -> None:
        for name in ("batch", "prompt_len", "new_tokens", "repeat", "long_tokens", "long_repeat"):
            if getattr(self, name) < 1:
                raise BenchError(f"{name} must be positive, got {getattr(self, name)}")
        if self.cold_repeat < 0:
            raise BenchError(f"cold_repeat must be >= 0, got {self.cold_repeat}")
        if self.warmup < 0 or (self.threads is not None and self.threads < 1):
            raise BenchError("warmup must be >= 0 and threads positive")
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown:
            raise BenchError(
                f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}"
            )
        if self.prompt_len < 2:
            raise BenchError("prompt_len must be at least 2 (BOS and one byte)")


def run_bench(options: BenchOptions, progress: bool = True) -> dict[str, Any]:
    options.validate()
    manifest = read_manifest(options.bundle)
    rows, skipped = plan_rows(manifest, options)
    context = manifest.generation.get("max_seq_len")
    if context is not None and options.prompt_len + options.new_tokens > context:
        raise BenchError(
            f"prompt_len + new_tokens ({options.prompt_len + options.new_tokens}) exceeds "
            f"the model's context of {context}"
        )
    long_tokens = (
        options.long_tokens
        if context is None
        else min(options.long_tokens, context - options.prompt_len)
    )
    bandwidth = memory_read_bandwidth(options.threads)
    bar = ProgressLine(len(rows), enabled=progress, every=1)
    measured = []
    for done, (backend, precision, weight_bytes) in enumerate(rows):
        bar.update(done, f"running {backend} {precision}", force=True)
        row = {
            **asdict(options),
            "backend": backend,
            "precision": precision,
            "long_tokens": long_tokens,
        }
        figures = _run_worker(row)
        measured.append(summarize(backend, precision, weight_bytes, figures, bandwidth, options))
    cold = None
    if options.cold_repeat and any(r[:2] == ("onnx", "fp32") for r in rows):
        bar.update(len(rows), "timing cold starts", force=True)
        cold = cold_start(options.bundle, "fp32", options.cold_repeat)
    bar.update(len(rows), "done", force=True)
    bar.close()
    return {
        "edgegen_bench": 1,
        "bundle": options.bundle,
        "options": asdict(options),
        "machine": machine_info(options.threads),
        "versions": manifest.data["producer"] | {"edgegen_bench": edgegen.__version__},
        "memory_read_bandwidth_bytes_per_s": bandwidth,
        "rows": add_ratios(measured),
        "skipped": skipped,
        "counts": {"run": len(measured), "skipped": len(skipped)},
        "same_tokens": _same_tokens(measured),
        "cold_start": cold,
    }


def plan_rows(manifest, options: BenchOptions) -> tuple[list[tuple[str, str, int]], list[dict]]:
    """(backend, precision, weight bytes) for every row that can run, and a skipped row
    {backend, precision, skipped: why} for every other row asked for."""
    rows, skipped = [], []
    fp32_bytes = min(a.bytes for a in manifest.artifacts if a.precision == "fp32")
    for backend in options.backends:
        for precision in ("fp32",) if backend == "eager" else options.precisions:
            artifact = [
                a for a in manifest.artifacts if a.format == backend and a.precision == precision
            ]
            why = _cannot_run(backend, precision, bool(artifact), options)
            if why:
                skipped.append({"backend": backend, "precision": precision, "skipped": why})
            else:
                rows.append((backend, precision, artifact[0].bytes if artifact else fp32_bytes))
    if not rows:
        have = ", ".join(f"{a.format}/{a.precision}" for a in manifest.artifacts)
        raise BenchError(f"nothing to benchmark: the bundle has {have}")
    return rows, skipped


def _cannot_run(backend: str, precision: str, in_bundle: bool, options: BenchOptions) -> str:
    """Why this row cannot run here, or ""."""
    if backend == "eager" and options.checkpoint is None:
        return "no checkpoint given"
    if backend != "eager" and not in_bundle:
        return f"the bundle has no {backend} {precision} artifact"
    if precision == "fp16" and options.device != "cuda":
        return "fp16 runs on a CUDA GPU (device cuda)"
    if options.device == "cuda" and not _cuda_available(backend):
        return "no CUDA GPU for " + ("ONNX Runtime" if backend == "onnx" else "torch")
    return ""


def _cuda_available(backend: str) -> bool:
    if backend == "onnx":
        from edgegen.runtime.backends import cuda_provider_available

        return cuda_provider_available()
    import torch

    return torch.cuda.is_available()


def summarize(backend, precision, weight_bytes, figures, bandwidth, options) -> dict[str, Any]:
    if "error" in figures:
        raise BenchError(f"{backend} {precision} row failed: {figures['error']}")
    decode = np.array([t for run in figures["runs"] for t in run["decode_s"]])
    prefill = np.array([run["prefill_s"] for run in figures["runs"]])
    steps = [len(run["decode_s"]) + 1 for run in figures["runs"]]
    overhead = [
        (run["wall_s"] - run["model_s"]) / n for run, n in zip(figures["runs"], steps, strict=True)
    ]
    floor = weight_bytes / bandwidth
    median = float(np.median(decode))
    return {
        "backend": backend,
        "precision": precision,
        "load_s": figures["load_s"],
        "huge_page_bytes": figures["huge_page_bytes"],
        "ttft_s": float(np.median(prefill)),
        "decode_s": {
            q: float(np.percentile(decode, p)) for q, p in (("p50", 50), ("p90", 90), ("p99", 99))
        },
        "decode_tokens_per_s": options.batch / median,
        "prefill_tokens_per_s": options.batch * options.prompt_len / float(np.median(prefill)),
        "overhead_per_token_s": float(np.median(overhead)),
        "peak_rss_bytes": figures["peak_rss_bytes"],
        "weight_bytes": weight_bytes,
        "floor_s": floor,
        "floor_multiple": median / floor,
        "runs": len(figures["runs"]),
        "torch_imported": figures["torch_imported"],
        "tokens": figures["tokens"],
        "per_position_decode_s": figures["long_decode_s"],
        "context_growth": context_growth(figures["long_decode_s"], options.prompt_len),
        "raw": figures["runs"],
    }


def context_growth(per_position: list[float], prompt_len: int, span: int = 16) -> dict | None:
    """Decode latency late in the long run over latency early in it (medians of `span`
    steps): 1.0 is a flat context."""
    if len(per_position) < 4 * span:
        return None
    early, late = np.median(per_position[:span]), np.median(per_position[-span:])
    return {
        "early_position": prompt_len + span // 2,
        "late_position": prompt_len + len(per_position) - span // 2,
        "ratio": float(late / early),
    }


def add_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Speed-ups over the eager fp32 row of the same run (absent without one)."""
    base = next((r for r in rows if r["backend"] == "eager"), None)
    for row in rows:
        if base is not None:
            row["decode_speedup_vs_eager"] = base["decode_s"]["p50"] / row["decode_s"]["p50"]
            row["ttft_speedup_vs_eager"] = base["ttft_s"] / row["ttft_s"]
    return rows


def _same_tokens(rows) -> bool:
    """Every fp32 row produced the same tokens (quantized rows may differ: each row records
    its agreement with the first fp32 row)."""
    first = rows[0]["tokens"] if rows else []
    reference = next((r["tokens"] for r in rows if r["precision"] == "fp32"), first)
    for row in rows:
        pairs = [
            (a, b)
            for x, y in zip(row["tokens"], reference, strict=False)
            for a, b in zip(x, y, strict=False)
        ]
        row["token_agreement_vs_fp32"] = sum(a == b for a, b in pairs) / max(1, len(pairs))
    return all(r["tokens"] == reference for r in rows if r["precision"] == "fp32")


def _run_worker(row: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "edgegen.bench.worker"],
        input=json.dumps(row),
        capture_output=True,
        text=True,
        cwd=Path.cwd(),
    )
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"worker exited with {done.returncode}: {last}"}
