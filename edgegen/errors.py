"""Typed errors. The CLI prints any EdgegenError as one line and exits non-zero."""


def first_line(error: BaseException) -> str:
    """An error's first line, for wrapping other libraries' multi-line messages."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class EdgegenError(Exception):
    """Base of every error edgegen raises on purpose."""


class ConfigError(EdgegenError, ValueError):
    """A model or training configuration is invalid."""


class TokenizerError(EdgegenError, ValueError):
    """A tokenizer spec or token id is invalid."""


class CorpusError(EdgegenError):
    """Training text is missing, unreadable or empty."""


class CheckpointError(EdgegenError):
    """A checkpoint directory is missing, incomplete or inconsistent."""


class OutputError(EdgegenError):
    """An output path may not be written: it exists, holds something else, or is in use."""


class TrainingError(EdgegenError):
    """A training run cannot go on (e.g. its loss stopped being finite)."""


class PeerStopped(EdgegenError):
    """A rank of a distributed run stops because another one failed; rank 0 says why
    (so the CLI ends this rank quietly)."""


class SamplingError(EdgegenError, ValueError):
    """A sampling parameter is out of range."""


class GenerationError(EdgegenError, ValueError):
    """A generation request cannot be served (e.g. it does not fit the context)."""


class ContextError(GenerationError):
    """A prompt (or a conversation's history) and its new tokens do not fit the context."""


class ChatError(GenerationError):
    """A chat cannot be rendered: no chat template, malformed messages, or the template
    refused them."""


class BundleError(EdgegenError):
    """A bundle or its manifest is missing, damaged, or not one this edgegen reads."""


class ExportError(EdgegenError):
    """A checkpoint could not be exported."""


class ParityError(ExportError):
    """An exported artifact disagrees with eager PyTorch beyond its tolerance."""


class QualityGateError(ParityError):
    """A quantized artifact fails its quality gate; `figures` are what it measured."""

    def __init__(self, message: str, figures: dict[str, float]) -> None:
        super().__init__(message)
        self.figures = figures


class BackendError(EdgegenError):
    """A backend or device is not available here."""


class VerifyError(EdgegenError):
    """A verification request is invalid, or verification found failures."""


class BenchError(EdgegenError):
    """A benchmark request is invalid or a row failed to run."""


class ImportModelError(EdgegenError):
    """A foreign model cannot be read or mapped."""
