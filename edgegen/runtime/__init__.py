"""The torch-free runtime: load a bundle and generate text.

    import edgegen.runtime
    gen = edgegen.runtime.load("runs/gpt-tiny.bundle")           # ONNX Runtime, CPU
    print(gen.generate("Return the ", max_new_tokens=60, seed=0).text)

Imports numpy and onnxruntime only; the TorchScript backend imports torch lazily.
"""

from __future__ import annotations

from pathlib import Path

from edgegen.errors import BackendError
from edgegen.runtime.backends import DEVICES, RUNNERS
from edgegen.runtime.decoder import in_place_state
from edgegen.runtime.generator import GenerationResult, Generator
from edgegen.runtime.manifest import Manifest, read_manifest, verify_artifact
from edgegen.runtime.sampler import Sampler, SamplingParams

__all__ = [
    "BACKENDS",
    "GenerationResult",
    "Generator",
    "Manifest",
    "Sampler",
    "SamplingParams",
    "load",
    "open_artifact",
    "read_manifest",
]

BACKENDS = tuple(RUNNERS)


def load(
    bundle_dir: str | Path,
    backend: str = "onnx",
    precision: str = "fp32",
    device: str = "cpu",
    threads: int | None = None,
) -> Generator:
    """A Generator over one artifact of a bundle, after validating the manifest and the
    hash of that artifact (a damaged int4 file does not block the healthy fp32 one;
    `edgegen verify` checks them all)."""
    _check_request(backend, device, threads, precision)  # before any file is read
    manifest = read_manifest(bundle_dir, verify_hashes=False)
    verify_artifact(manifest, manifest.artifact(backend, precision))
    return _open(manifest, backend, precision, device, threads)


def open_artifact(
    manifest: Manifest,
    backend: str = "onnx",
    precision: str = "fp32",
    device: str = "cpu",
    threads: int | None = None,
) -> Generator:
    """A Generator over one artifact of an already validated manifest."""
    _check_request(backend, device, threads, precision)
    return _open(manifest, backend, precision, device, threads)


def _open(manifest: Manifest, backend, precision, device, threads) -> Generator:
    artifact = manifest.artifact(backend, precision)
    input_names = [io["name"] for io in manifest.signature["inputs"]]
    runner = RUNNERS[backend](
        manifest.path_of(artifact),
        input_names,
        device,
        threads,
        artifact.session_config,
        in_place_state(manifest.signature),
    )
    return Generator(runner, manifest.signature, manifest.tokenizer, manifest.generation, backend)


def _check_request(backend: str, device: str, threads, precision: str) -> None:
    if backend not in RUNNERS:
        raise BackendError(f"unknown backend {backend!r}; choose from {', '.join(RUNNERS)}")
    if device not in DEVICES:
        raise BackendError(f"unknown device {device!r}; choose from {', '.join(DEVICES)}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise BackendError(f"threads must be a positive integer, got {threads!r}")
    if precision == "fp16" and device != "cuda":
        raise BackendError("fp16 artifacts are for GPUs: load them with device='cuda'")
