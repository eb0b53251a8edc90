"""Checkpoint -> bundle: export each format, gate it on parity, write the manifest,
and publish the directory in one rename only when everything passed."""

from __future__ import annotations

import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import onnxruntime
import torch

import edgegen
from edgegen.checkpoint import load_checkpoint
from edgegen.config import GPTConfig, config_to_dict
from edgegen.errors import ExportError
from edgegen.export.onnx import DEFAULT_OPSET, export_onnx
from edgegen.export.parity import artifact_runner, check_parity
from edgegen.export.spec import step_spec
from edgegen.export.torchscript import export_torchscript
from edgegen.files import sha256_file, write_atomically, write_json
from edgegen.runtime.generator import default_generation_config
from edgegen.runtime.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_FILE,
    Artifact,
    Manifest,
    read_manifest,
)
from edgegen.tokenizer import save_tokenizer

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
) -> Manifest:
    """Export a checkpoint to a bundle directory and return its manifest.

    Raises ExportError (ParityError when an artifact disagrees with eager PyTorch);
    then nothing is written and an existing bundle at `out` is untouched.
    """
    out = Path(out)
    formats = _check_formats(formats)
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; pass --force to replace it")
    if out.resolve() == Path(checkpoint).resolve():
        raise ExportError("the bundle cannot replace its own checkpoint directory")
    model, tokenizer = load_checkpoint(checkpoint)
    context = _context_length(model.config, max_seq_len)
    spec = step_spec(model)

    def fill(tmp: Path) -> None:
        save_tokenizer(tokenizer, tmp / TOKENIZER_FILE)
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
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "model": {"family": model.config.family, "config": _config_fields(model.config)},
            "tokenizer": {"file": TOKENIZER_FILE, "spec": tokenizer.to_dict()},
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
