"""Checkpoint -> bundle: export each format, gate it on parity, write the manifest,
and publish the directory in one rename only when everything passed."""

from __future__ import annotations

import copy
import math
import platform
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnxruntime
import torch

import edgegen
from edgegen.checkpoint import load_checkpoint
from edgegen.config import GPTConfig, config_to_dict
from edgegen.errors import BundleError, ExportError, ParityError, QualityGateError
from edgegen.export.onnx import DEFAULT_OPSET, check_opset, export_onnx
from edgegen.export.parity import (
    QUALITY_GATES,
    artifact_runner,
    calibration_windows,
    check_parity,
    describe_gate,
    eval_windows,
    gate_for,
    passes_gate,
    quality_figures,
    step_grid,
)
from edgegen.export.quantize import (
    DEFAULT_ACCURACY_LEVEL,
    FIT_NAMES,
    INT4_BLOCKS,
    INT4_FITS,
    INT8_BLOCKS,
    QUANTIZED_PRECISIONS,
    SUPPORTED,
    four_bit_grid,
    quantize_onnx,
    quantize_torch_int8,
)
from edgegen.export.quantize import FILENAMES as QUANTIZED_FILENAMES
from edgegen.export.spec import step_spec
from edgegen.export.torchscript import export_torchscript, model_from_torchscript
from edgegen.files import sha256_file, write_atomically, write_json
from edgegen.output import claim_output
from edgegen.runtime.backends import cuda_provider_available
from edgegen.runtime.generator import default_generation_config
from edgegen.runtime.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_FILE,
    Artifact,
    Manifest,
    read_manifest,
)
from edgegen.tokenizer import write_tokenizer_file

FORMATS = ("onnx", "torchscript")
FILENAMES = {"onnx": "model.onnx", "torchscript": "model.ts"}
EXPORTERS: dict[str, Callable[..., None]] = {
    "onnx": export_onnx,
    "torchscript": export_torchscript,
}
TOKENIZER_FILE = "tokenizer.json"


def export_bundle(
    checkpoint: str | Path,
    out: str | Path,
    formats: tuple[str, ...] | list[str] = FORMATS,
    opset: int = DEFAULT_OPSET,
    max_seq_len: int | None = None,
    force: bool = False,
    on_artifact: Callable[[str], None] | None = None,
    quantize: QuantizeOptions | None = None,
) -> Manifest:
    """Export a checkpoint to a bundle directory and return its manifest.

    Raises ExportError (ParityError when an artifact disagrees with eager PyTorch or
    a quantized one fails its quality gate); then nothing is written and an
    existing bundle at `out` is untouched.
    """
    out = Path(out)
    formats = _check_formats(formats)
    quantize = quantize or QuantizeOptions()
    quantize.validate(formats)
    if "onnx" in formats:
        check_opset(opset)
    with claim_output(out, "bundle", inputs=[checkpoint], force=force):
        model, tokenizer = load_checkpoint(checkpoint)
        return _export_claimed(
            model, tokenizer, out, formats, opset, max_seq_len, on_artifact, quantize
        )


def _export_claimed(model, tokenizer, out, formats, opset, max_seq_len, on_artifact, quantize):
    context = _context_length(model.config, max_seq_len)
    spec = step_spec(model)
    # held-out text the tokenizer cannot measure fails before exporting
    text = held_out(tokenizer, quantize.eval_text, spec) if quantize.precisions else None

    def fill(tmp: Path) -> None:
        tokenizer_section = _write_tokenizer(tokenizer, tmp)
        artifacts, parity = [], {}
        for fmt in formats:
            if on_artifact:
                on_artifact(fmt)
            path = tmp / FILENAMES[fmt]
            EXPORTERS[fmt](spec, path, opset)
            parity[path.name] = check_parity(spec, artifact_runner(fmt, path, spec), path.name)
            artifacts.append(
                Artifact(
                    path=path.name,
                    format=fmt,
                    precision="fp32",
                    sha256=sha256_file(path),
                    bytes=path.stat().st_size,
                    opset=opset if fmt == "onnx" else None,
                )
            )
        for artifact, report in add_quantized(
            tmp, model, spec, formats, quantize, on_artifact, text
        ):
            artifacts.append(artifact)
            parity[artifact.path] = report
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "model": {"family": model.config.family, "config": _config_fields(model.config)},
            "tokenizer": tokenizer_section,
            "signature": spec.signature(),
            "artifacts": [a.to_dict() for a in artifacts],
            "parity": {"reference": "eager PyTorch fp32", "artifacts": parity},
            "generation": default_generation_config(tokenizer, context),
            "producer": _producer(),
        }
        write_json(tmp / MANIFEST_FILE, manifest)
        read_manifest(tmp)  # what we publish must pass the runtime's own validation

    write_atomically(out, fill)
    return read_manifest(out)


def _write_tokenizer(tokenizer, tmp: Path) -> dict[str, Any]:
    """The bundle's tokenizer file, hashed like an artifact, and its manifest section."""
    path = tmp / TOKENIZER_FILE
    write_tokenizer_file(tokenizer, path)
    return {"file": TOKENIZER_FILE, "sha256": sha256_file(path), "spec": tokenizer.to_dict()}


@dataclass
class QuantizeOptions:
    precisions: tuple[str, ...] = ()  # any of int8, int4, fp16
    block_size: int | None = None  # MatMulNBits block; None: INT8_BLOCKS in turn, int4 32
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL  # MatMulNBits compute type
    gates: dict[str, dict[str, float]] = field(default_factory=dict)  # over QUALITY_GATES
    eval_text: str | None = None  # held-out text; None = the embedded corpus's validation split

    def validate(self, formats: tuple[str, ...]) -> None:
        unknown = [p for p in self.precisions if p not in QUANTIZED_PRECISIONS]
        if unknown:
            choices = ", ".join(QUANTIZED_PRECISIONS)
            raise ExportError(f"unknown precision {', '.join(unknown)}; choose from {choices}")
        for precision, gate in self.gates.items():
            if precision not in QUALITY_GATES or not set(gate) <= set(QUALITY_GATES[precision]):
                raise ExportError(f"unknown quality gate {precision}.{', '.join(gate)}")
        if self.precisions and not any(
            (f, p) in SUPPORTED for f in formats for p in self.precisions
        ):
            raise ExportError("none of the asked precisions exists for the asked formats")

    def gate(self, precision: str) -> dict[str, float]:
        return gate_for(precision, self.gates)


@dataclass
class HeldOut:
    """Text the exporter measures the model on: the quality gates' windows and the
    calibration rows' step feeds (None when the tokenizer cannot encode the corpus)."""

    windows: torch.Tensor
    calibration: list[dict[str, Any]] | None


def held_out(tokenizer, eval_text, spec) -> HeldOut:
    windows = eval_windows(tokenizer, eval_text, spec)
    rows = calibration_windows(tokenizer, spec)
    feeds = None
    if rows is not None:
        feeds = [
            {k: v.numpy() for k, v in spec.prefill_feeds(chunk).items()} for chunk in rows.split(4)
        ]
    return HeldOut(windows, feeds)


def add_quantized(tmp: Path, model, spec, formats, options: QuantizeOptions, on_artifact, text):
    """Yield (artifact, report) for each quantized artifact, made from what is in `tmp`
    and gated on quality against eager fp32 on `text` (HeldOut); raise ParityError when
    one fails."""
    if not options.precisions:
        return
    for precision in options.precisions:
        for fmt in formats:
            if (fmt, precision) not in SUPPORTED:
                continue
            if on_artifact:
                on_artifact(f"{fmt} {precision}")
            path = tmp / QUANTIZED_FILENAMES[(fmt, precision)]
            coverage, report = _quantize_and_gate(
                fmt, precision, tmp, path, model, spec, options, text
            )
            session_config = coverage.pop("session_config", None)
            artifact = Artifact(
                path=path.name,
                format=fmt,
                precision=precision,
                sha256=sha256_file(path),
                bytes=path.stat().st_size,
                opset=_opset(path) if fmt == "onnx" else None,
                quantization=coverage,
                session_config=session_config,
            )
            yield artifact, report


def quantize_bundle(
    bundle: str | Path,
    checkpoint: str | Path | None,
    options: QuantizeOptions,
    on_artifact: Callable[[str], None] | None = None,
) -> Manifest:
    """Add quantized artifacts to an existing bundle (replacing any of the same format
    and precision), gated on quality against the model in eager PyTorch. The bundle is
    rebuilt beside itself and swapped in only when every gate passed.

    Without `checkpoint`, the eager model is rebuilt from the bundle's fp32 TorchScript
    artifact, whose weights are the exported ones (it passed the parity gate)."""
    inputs = [checkpoint] if checkpoint is not None else []
    with claim_output(bundle, "bundle", inputs=inputs, existing=True):
        return _quantize_claimed(Path(bundle), checkpoint, options, on_artifact)


def _quantize_claimed(bundle: Path, checkpoint, options: QuantizeOptions, on_artifact) -> Manifest:
    manifest = read_manifest(bundle)
    if checkpoint is None:
        model = model_from_torchscript(manifest.path_of(_traced(manifest)), manifest.config)
        tokenizer = manifest.tokenizer
    else:
        model, tokenizer = load_checkpoint(checkpoint)
    if model.config != manifest.config:
        raise ExportError(
            f"checkpoint {checkpoint} is not the model in bundle {bundle} (configs differ)"
        )
    formats = tuple(
        f
        for f in FORMATS
        if any(a.format == f and a.precision == "fp32" for a in manifest.artifacts)
    )
    options.validate(formats)
    spec = step_spec(model)
    # held-out text the tokenizer cannot measure fails before anything is copied
    text = held_out(tokenizer, options.eval_text, spec) if options.precisions else None

    def fill(tmp: Path) -> None:
        for path in Path(bundle).iterdir():
            if path.is_file():
                shutil.copy2(path, tmp / path.name)
        data = copy.deepcopy(manifest.data)
        parity = data["parity"]["artifacts"]
        for artifact, report in add_quantized(
            tmp, model, spec, formats, options, on_artifact, text
        ):
            data["artifacts"] = [
                a
                for a in data["artifacts"]
                if (a["format"], a["precision"]) != (artifact.format, artifact.precision)
            ] + [artifact.to_dict()]
            parity[artifact.path] = report
        write_json(tmp / MANIFEST_FILE, data)
        read_manifest(tmp)

    write_atomically(Path(bundle), fill)
    return read_manifest(bundle)


def _quantize_and_gate(fmt, precision, tmp, path, model, spec, options, text):
    """(coverage, quality report) of the first attempt (_attempts) whose artifact passes
    the gate. The method names the attempts that failed, with their figures."""
    attempts = _attempts(fmt, precision, spec, options)

    def attempt(fit, block):
        coverage = _make_quantized(fmt, precision, tmp, path, model, options, fit, block, text)
        device = "cuda" if precision == "fp16" else "cpu"
        run = artifact_runner(fmt, path, spec, device, coverage.get("session_config"))
        gate = options.gate(precision)
        return coverage, gate_quantized(spec, run, path.name, precision, gate, text.windows)

    failed = []
    for fit, block in attempts[:-1]:
        try:
            coverage, report = attempt(fit, block)
            break
        except QualityGateError as e:
            failed.append(
                f"{FIT_NAMES[fit]} round-to-nearest in blocks of {block} failed the gate: "
                f"{_measured(e.figures)}"
            )
    else:
        try:
            coverage, report = attempt(*attempts[-1])
        except QualityGateError as e:
            raise QualityGateError("; ".join([str(e).rstrip("."), *failed]), e.figures) from None
    if failed:
        coverage["method"] += f" ({'; '.join(failed)})"
    return coverage, report


def _attempts(fmt, precision, spec, options) -> list[tuple[str, int | None]]:
    """(fit, block size) to try in turn, fastest to run first, unless a block size was
    asked for. A transformer's ONNX int4 tries the fits of INT4_FITS (a symmetric grid,
    then an asymmetric one, both run by MatMulNBits' own kernel, then HQQ, whose float
    zero points cost a block sum per input and an extra block per weight:
    quantize.move_zero_points_out) in blocks of 128, then 64, then 32: the 4-bit kernel
    runs coarser blocks faster (fewer scales), finer ones hold the weights closer. Its
    int8 tries blocks of 64, then 32 (MatMulNBits reads blocks of 64 about 15% faster:
    fewer scales, fewer int8 activation blocks to sum; the finer blocks quantize
    outlying activations better). Only sizes that divide the model's widths are tried
    (a partial block is padding)."""
    block = options.block_size
    if fmt != "onnx" or not spec.is_gpt or precision not in ("int8", "int4"):
        return [("rtn", block)]
    if precision == "int8":
        return [("rtn", size) for size in _block_sizes(spec, INT8_BLOCKS, block)]
    return [(fit, size) for size in _int4_blocks(spec, block) for fit in INT4_FITS]


def _block_sizes(spec, sizes: tuple[int, ...], asked: int | None) -> list[int]:
    """The block sizes to try: the one asked for, else those of `sizes` that divide the
    model's widths (the finest of them when none does)."""
    if asked is not None:
        return [asked]
    config = spec.module.model.config
    fitting = [b for b in sizes if config.dim % b == 0 and config.mlp_dim % b == 0]
    return fitting or list(sizes[-1:])


def _int4_blocks(spec, asked: int | None) -> list[int]:
    """_block_sizes for int4, but weights that already sit on a 4-bit grid (imported
    from a Q4 GGUF) keep its blocks (quantize.four_bit_grid reads the first block's)."""
    if asked is None:
        first = spec.module.model.blocks[0]  # a GPT has at least one (config.n_layers)
        linears = [m for m in first.modules() if isinstance(m, torch.nn.Linear)]
        grid = four_bit_grid([m.weight.detach().float().cpu().numpy() for m in linears])
        if grid is not None:
            return [grid]
    return _block_sizes(spec, INT4_BLOCKS, asked)


def _make_quantized(fmt, precision, tmp, path, model, options, fit, block, text) -> dict[str, Any]:
    if precision == "fp16":
        _require_cuda_provider()
    if fmt == "onnx":  # the fp32 graph was written to tmp just before
        src = tmp / FILENAMES["onnx"]
        return quantize_onnx(
            src, path, precision, block, options.accuracy_level, fit, text.calibration
        )
    quantized, coverage = quantize_torch_int8(model)
    export_torchscript(step_spec(quantized), path)
    return coverage


def _traced(manifest: Manifest):
    try:
        return manifest.artifact("torchscript", "fp32")
    except BundleError:
        raise ExportError(
            f"bundle {manifest.directory} has no fp32 TorchScript artifact to recover the "
            "weights from: pass --checkpoint"
        ) from None


def gate_quantized(spec, run, name: str, precision: str, gate, windows) -> dict[str, Any]:
    """A quantized artifact must run every shape of the grid (right shapes, finite values)
    and pass its quality gate on held-out text."""
    for check in step_grid(spec, run, tolerance=1e9):
        if not check["passed"]:
            raise ParityError(f"{name}: {check['case']}: wrong shape or non-finite output")
    figures = quality_figures(spec, run, windows)
    if not passes_gate(figures, gate):
        raise QualityGateError(
            f"{name} fails its {precision} quality gate ({describe_gate(gate)}): "
            f"{_measured(figures)}; lower the gate explicitly (--gate) to accept it",
            figures,
        )
    finite = {k: v for k, v in gate.items() if math.isfinite(v)}
    return {"precision": precision, "gate": finite, "quality": figures, "passed": True}


def _measured(figures: dict[str, float]) -> str:
    return f"KL {figures['kl']:.2e}, top-1 {figures['top1']:.2%}, ppl {figures['ppl_change']:+.2%}"


def _require_cuda_provider() -> None:
    if not cuda_provider_available():
        raise ExportError(
            "fp16 artifacts are for GPUs and are checked on one: this machine's onnxruntime "
            "has no CUDA execution provider (pip install onnxruntime-gpu on a CUDA machine)"
        )


def _opset(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    return max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _check_formats(formats) -> tuple[str, ...]:
    formats = tuple(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ExportError(
            f"unknown format {', '.join(unknown) or '(none)'}; choose from {', '.join(FORMATS)}"
        )
    return formats


def _context_length(config, max_seq_len: int | None) -> int | None:
    """The context the runtime will allow: the model's, or less when asked."""
    limit = config.max_seq_len if isinstance(config, GPTConfig) else None
    if max_seq_len is None:
        return limit
    if max_seq_len < 1:
        raise ExportError(f"max_seq_len must be positive, got {max_seq_len}")
    if limit is not None and max_seq_len > limit:
        raise ExportError(f"max_seq_len {max_seq_len} exceeds the model's context of {limit}")
    return max_seq_len


def _config_fields(config) -> dict[str, Any]:
    fields = config_to_dict(config)
    fields.pop("family")
    return fields


def _producer() -> dict[str, str]:
    import onnxscript

    return {
        "edgegen": edgegen.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }
