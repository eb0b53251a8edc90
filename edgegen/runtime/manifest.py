"""The bundle manifest: its schema, reading and validation (torch-free).

A bundle is a directory whose `manifest.json` says everything the runtime needs:
the model family and config, the tokenizer, the step signature (names, dtypes,
symbolic dims, which output feeds which state input), every artifact with its
format, precision, opset and sha256, the export parity report, generation
defaults, and the versions of the tools that produced it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any

from edgegen.config import GPTConfig, ModelConfig, config_from_dict
from edgegen.errors import BundleError, EdgegenError
from edgegen.files import sha256_file
from edgegen.output import try_recover
from edgegen.runtime.onnx_refs import external_data_locations
from edgegen.tokenizer import Tokenizer, read_tokenizer, spec_type

MANIFEST_FILE = "manifest.json"
FORMAT_NAME = "edgegen-bundle"
# 2: a GPT step returns only new keys/values; the runtime owns the cache
# 3: the tokenizer file is hashed like an artifact; generation eos_token_id may list ids
# 4: a GPT step writes its new keys/values into the KV buffer it is given (present)
FORMAT_VERSION = 4
ARTIFACT_FORMATS = ("onnx", "torchscript")
PRECISIONS = ("fp32", "int8", "int4", "fp16")
DTYPES = ("int64", "float32")
LAYOUTS = ("kv_cache", "recurrent")
# ONNX Runtime session entries an artifact may ask for. disable_quant_qdq lets ORT fold
# weight-only DequantizeLinear into float weights at load (no int8 RNN kernels exist).
SESSION_CONFIG_KEYS = ("session.disable_quant_qdq",)

_REQUIRED = {
    "format": str,
    "format_version": int,
    "model": dict,
    "tokenizer": dict,
    "signature": dict,
    "artifacts": list,
    "parity": dict,
    "generation": dict,
    "producer": dict,
}


@dataclass(frozen=True)
class Artifact:
    path: str  # relative to the bundle, POSIX separators
    format: str  # "onnx" or "torchscript"
    precision: str  # "fp32"
    sha256: str
    bytes: int
    opset: int | None = None  # ONNX only
    quantization: dict[str, Any] | None = None  # method and coverage (quantized artifacts)
    external_data: dict[str, str] | None = None  # ONNX external-data file -> sha256
    session_config: dict[str, str] | None = None  # ONNX Runtime entries to open it with

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass(frozen=True)
class Manifest:
    directory: Path
    data: dict[str, Any]
    config: ModelConfig
    artifacts: tuple[Artifact, ...]

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """Read on first use, after checking its file as an artifact is checked (inside
        the bundle, present, its sha256) and that its ids fit the model."""
        return _read_bundle_tokenizer(self)

    @property
    def signature(self) -> dict[str, Any]:
        return self.data["signature"]

    @property
    def generation(self) -> dict[str, Any]:
        return self.data["generation"]

    def artifact(self, format: str, precision: str = "fp32") -> Artifact:
        for artifact in self.artifacts:
            if artifact.format == format and artifact.precision == precision:
                return artifact
        have = ", ".join(f"{a.format}/{a.precision}" for a in self.artifacts) or "none"
        raise BundleError(
            f"bundle {self.directory} has no {format} {precision} artifact (it has: {have})"
        )

    def path_of(self, artifact: Artifact) -> Path:
        return self.directory / artifact.path


def read_manifest(directory: str | Path, verify_hashes: bool = True) -> Manifest:
    """Read and validate a bundle's manifest; with `verify_hashes`, check every artifact file
    and the tokenizer's (else the tokenizer's is checked when first used)."""
    directory = Path(directory)
    try_recover(directory)
    if not directory.is_dir():
        raise BundleError(f"bundle directory not found: {directory}")
    path = directory / MANIFEST_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{directory} is not a bundle: it has no {MANIFEST_FILE}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"cannot read {path}: {e}") from None
    manifest = parse_manifest(data, directory)
    if verify_hashes:
        for artifact in manifest.artifacts:
            verify_artifact(manifest, artifact)
        _ = manifest.tokenizer  # reading it checks its file
    return manifest


def parse_manifest(data: Any, directory: Path) -> Manifest:
    if not isinstance(data, dict):
        raise BundleError("manifest must be a JSON object")
    for key, kind in _REQUIRED.items():
        if key not in data:
            raise BundleError(f"manifest is missing the field {key!r}")
        if not isinstance(data[key], kind):
            raise BundleError(f"manifest field {key!r} must be a {kind.__name__}")
    if data["format"] != FORMAT_NAME:
        raise BundleError(f"not an edgegen bundle manifest (format {data['format']!r})")
    version = data["format_version"]
    if version > FORMAT_VERSION:
        raise BundleError(
            f"bundle format version {version} is not supported: this edgegen reads "
            f"version {FORMAT_VERSION} (upgrade edgegen to read newer bundles)"
        )
    if version < FORMAT_VERSION:
        raise BundleError(
            f"bundle format version {version} is older than this edgegen's {FORMAT_VERSION}: "
            "export the checkpoint again"
        )
    if not isinstance(data["model"].get("config"), dict):
        raise BundleError("manifest field 'model' needs a 'config' object")
    try:
        config = config_from_dict(
            {"family": data["model"].get("family"), **data["model"]["config"]}
        )
        spec_type(data["tokenizer"].get("spec"))
    except EdgegenError as e:
        raise BundleError(f"manifest: {e}") from None
    _check_signature(data["signature"])
    _check_generation(data["generation"])
    _check_context(data["generation"], config, data["signature"]["layout"])
    artifacts = tuple(_parse_artifact(a) for a in data["artifacts"])
    if not artifacts:
        raise BundleError("manifest lists no artifacts")
    _check_tokenizer(data["tokenizer"])
    return Manifest(directory, data, config, artifacts)


def verify_artifact(manifest: Manifest, artifact: Artifact) -> Path:
    """The artifact's path, after checking it exists inside the bundle with the right hash."""
    path = manifest.path_of(artifact)
    root = manifest.directory.resolve()
    if not path.resolve().is_relative_to(root):
        raise BundleError(f"artifact {artifact.path} resolves outside the bundle directory")
    if not path.is_file():
        raise BundleError(f"bundle {manifest.directory} is missing {artifact.path}")
    _check_hash(path, artifact.path, artifact.sha256)
    if artifact.format == "onnx":
        _check_external_data(manifest, artifact, path)
    return path


def _read_bundle_tokenizer(manifest: Manifest) -> Tokenizer:
    section, root = manifest.data["tokenizer"], manifest.directory.resolve()
    path = manifest.directory / section["file"]
    if not path.resolve().is_relative_to(root):
        raise BundleError(f"tokenizer file {section['file']} resolves outside the bundle directory")
    if not path.is_file():
        raise BundleError(f"bundle {manifest.directory} is missing {section['file']}")
    _check_hash(path, section["file"], section["sha256"])
    try:
        return read_tokenizer(section["spec"], path, manifest.config.vocab_size)
    except EdgegenError as e:
        raise BundleError(f"bundle {manifest.directory}: {e}") from None


def _check_hash(path: Path, name: str, expected: str) -> None:
    digest = sha256_file(path)
    if digest != expected:
        raise BundleError(
            f"{name} does not match its manifest hash (sha256 {digest[:12]}..., "
            f"expected {expected[:12]}...): the file is damaged or was changed"
        )


def _check_external_data(manifest: Manifest, artifact: Artifact, path: Path) -> None:
    """Every file the ONNX model at `path` reads its weights from must sit inside the
    bundle and be hashed in the manifest, like the model itself."""
    listed = artifact.external_data or {}
    for location in sorted(external_data_locations(path)):
        where = f"{artifact.path} keeps weights in {location!r}"
        try:
            _check_relative_path(location)
        except BundleError:
            raise BundleError(f"{where}, outside the bundle directory") from None
        target = path.parent / location
        if not target.resolve().is_relative_to(manifest.directory.resolve()):
            raise BundleError(f"{where}, which resolves outside the bundle directory")
        relative = target.relative_to(manifest.directory).as_posix()
        if relative not in listed:
            raise BundleError(f"{where}, a file the manifest does not hash")
        if not target.is_file():
            raise BundleError(f"{where}, which is missing")
        _check_hash(target, relative, listed[relative])


def _parse_artifact(data: Any) -> Artifact:
    if not isinstance(data, dict):
        raise BundleError("each manifest artifact must be a JSON object")
    try:
        artifact = Artifact(**data)
    except TypeError as e:
        raise BundleError(f"manifest artifact {data.get('path')!r}: {e}") from None
    _check_relative_path(artifact.path)
    if artifact.format not in ARTIFACT_FORMATS:
        raise BundleError(f"artifact {artifact.path}: unknown format {artifact.format!r}")
    if artifact.precision not in PRECISIONS:
        raise BundleError(f"artifact {artifact.path}: unknown precision {artifact.precision!r}")
    _check_sha256(artifact.sha256, artifact.path)
    if artifact.session_config is not None and (
        not isinstance(artifact.session_config, dict)
        or not set(artifact.session_config) <= set(SESSION_CONFIG_KEYS)
        or not all(isinstance(v, str) for v in artifact.session_config.values())
    ):
        raise BundleError(
            f"artifact {artifact.path}: session_config may only set "
            f"{', '.join(SESSION_CONFIG_KEYS)} (to strings)"
        )
    if artifact.external_data is not None:
        if not isinstance(artifact.external_data, dict):
            raise BundleError(f"artifact {artifact.path}: external_data must be an object")
        for name, digest in artifact.external_data.items():
            _check_relative_path(name)
            _check_sha256(digest, name)
    return artifact


def _check_tokenizer(section: dict[str, Any]) -> None:
    """The tokenizer's file follows the artifacts' rules: a relative path, a sha256."""
    try:
        _check_relative_path(section.get("file"))
    except BundleError:
        raise BundleError(
            f"tokenizer file {section.get('file')!r} must be a path inside the bundle directory"
        ) from None
    digest = section.get("sha256")
    if not isinstance(digest, str) or not re.fullmatch("[0-9a-f]{64}", digest):
        raise BundleError("manifest tokenizer: sha256 must be 64 hex digits")


def _check_sha256(digest: Any, name: str) -> None:
    if not isinstance(digest, str) or not re.fullmatch("[0-9a-f]{64}", digest):
        raise BundleError(f"artifact {name}: sha256 must be 64 hex digits")


def _check_relative_path(path: Any) -> None:
    if not isinstance(path, str) or not path:
        raise BundleError("artifact path must be a non-empty string")
    pure = PurePosixPath(path)
    if pure.is_absolute() or "\\" in path or ":" in path or ".." in pure.parts:
        raise BundleError(f"artifact path {path!r} must stay inside the bundle directory")


def _check_signature(signature: dict[str, Any]) -> None:
    """Everything the Decoder relies on, so a damaged manifest stops here, not mid-run."""
    for key in ("inputs", "outputs", "state"):
        if not isinstance(signature.get(key), list):
            raise BundleError(f"manifest signature is missing its {key!r} list")
    layout = signature.get("layout")
    if not isinstance(layout, dict) or layout.get("kind") not in LAYOUTS:
        raise BundleError(f"manifest signature layout kind must be one of {', '.join(LAYOUTS)}")
    names: dict[str, dict[str, Any]] = {}
    for io in signature["inputs"] + signature["outputs"]:
        if not isinstance(io, dict) or not isinstance(io.get("name"), str):
            raise BundleError("each signature input/output needs a name")
        if io.get("dtype") not in DTYPES:
            raise BundleError(f"signature {io['name']}: unknown dtype {io.get('dtype')!r}")
        shape = io.get("shape")
        if not isinstance(shape, list) or not all(_is_dim(d) for d in shape):
            raise BundleError(f"signature {io['name']}: shape must list dim names or sizes")
        names[io["name"]] = io
    inputs = {io["name"] for io in signature["inputs"]}
    needed = {"input_ids"} | (
        {"position_ids", "attention_mask"} if layout["kind"] == "kv_cache" else set()
    )
    if not needed <= inputs:
        raise BundleError(
            f"manifest signature lacks the inputs {', '.join(sorted(needed - inputs))}"
        )
    for pair in signature["state"]:
        if (
            not isinstance(pair, dict)
            or not isinstance(pair.get("input"), str)
            or not isinstance(pair.get("output"), str)
            or pair["input"] not in inputs
            or pair["output"] not in names
        ):
            raise BundleError(f"signature state entry {pair!r} names an unknown input or output")
    if not signature["state"] or not all(
        "batch" in names[pair["input"]]["shape"] for pair in signature["state"]
    ):
        raise BundleError("manifest signature needs state inputs with a batch axis")
    if layout["kind"] == "kv_cache" and (
        layout.get("update") != "in_place"
        or any("past" not in names[pair["input"]]["shape"] for pair in signature["state"])
    ):
        raise BundleError("manifest signature: a KV cache needs a past axis, updated in place")


def _check_generation(generation: dict[str, Any]) -> None:
    for key, ok in _GENERATION_TYPES.items():
        if key in generation and not ok(generation[key]):
            raise BundleError(f"manifest generation field {key!r} has a bad value")


def _check_context(generation: dict[str, Any], config: ModelConfig, layout: dict) -> None:
    """The runtime stops generation at generation.max_seq_len; past the positions the
    graph was built for it would fail mid-run, so that limit may not exceed them."""
    limits = [config.max_seq_len] if isinstance(config, GPTConfig) else []
    if isinstance(layout.get("max_seq_len"), int):
        limits.append(layout["max_seq_len"])
    if not limits:
        return  # an RNN has no context limit
    context, limit = generation.get("max_seq_len"), min(limits)
    if not isinstance(context, int) or not 1 <= context <= limit:
        raise BundleError(
            f"manifest generation max_seq_len {context!r} must be between 1 and the "
            f"model's context of {limit} tokens"
        )


def _is_dim(d: Any) -> bool:
    return isinstance(d, str) or (isinstance(d, int) and not isinstance(d, bool) and d >= 0)


def _optional_int(value: Any) -> bool:
    return value is None or _is_id(value)


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


_GENERATION_TYPES = {
    "add_bos": lambda v: isinstance(v, bool),
    "bos_token_id": _optional_int,
    "eos_token_id": lambda v: _optional_int(v) or (isinstance(v, list) and all(map(_is_id, v))),
    "pad_token_id": _optional_int,
    "max_seq_len": _optional_int,
    "max_new_tokens": _optional_int,
}
