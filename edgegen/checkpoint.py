"""Checkpoint directories: config.json, model.safetensors, tokenizer.json (+ tokenizer_spec.json
for an HF tokenizer, + training files).

Nothing here unpickles: weights are safetensors, everything else is JSON. A
checkpoint is written into a temporary sibling directory and renamed into place,
so a reader never sees a half-written one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from edgegen.config import ModelConfig, load_config, save_config
from edgegen.errors import CheckpointError, EdgegenError, first_line
from edgegen.files import check_seal, seal
from edgegen.models import build_model
from edgegen.output import try_recover
from edgegen.tokenizer import SPEC_FILE, TOKENIZER_FILE, Tokenizer, load_tokenizer, save_tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE)
OPTIONAL_FILES = (SPEC_FILE, "source.json")  # an HF tokenizer's spec; an import's origin


def write_model_files(directory: Path, model: torch.nn.Module, tokenizer: Tokenizer) -> None:
    """The model's files, sealed with their hashes (a writer adding more files seals again)."""
    save_config(model.config, directory / CONFIG_FILE)
    save_tokenizer(tokenizer, directory)
    save_model(model, str(directory / WEIGHTS_FILE))
    seal(directory)


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, tokenizer) from a checkpoint directory."""
    directory = Path(directory)
    try_recover(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    missing = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {directory} is missing {', '.join(missing)}")
    check_seal(
        directory, [*REQUIRED_FILES, *(n for n in OPTIONAL_FILES if (directory / n).exists())]
    )
    try:
        config: ModelConfig = load_config(directory / CONFIG_FILE)
        tokenizer = load_tokenizer(directory, config.vocab_size)
    except EdgegenError as e:
        raise CheckpointError(f"checkpoint {directory}: {e}") from None
    model = build_model(config)
    try:
        load_model(model, str(directory / WEIGHTS_FILE), device=str(device))
    except (SafetensorError, RuntimeError, OSError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {directory}: cannot load weights: {first_line(e)}"
        ) from None
    return model.to(device).eval(), tokenizer
