"""Eager PyTorch behind the runtime's step interface: the oracle and the baseline.

The same Decoder, sampler and generation loop drive it as drive the exported
artifacts, so eager, TorchScript and ONNX Runtime are compared like with like.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgegen.checkpoint import load_checkpoint
from edgegen.config import GPTConfig
from edgegen.export.spec import step_spec
from edgegen.runtime.generator import Generator, default_generation_config
from edgegen.tokenizer import Tokenizer


class EagerRunner:
    def __init__(self, model: torch.nn.Module) -> None:
        self.spec = step_spec(model)
        self.device = next(model.parameters()).device

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with torch.inference_mode():
            args = [torch.from_numpy(feeds[n]).to(self.device) for n in self.spec.input_names]
            return [t.float().cpu().numpy() for t in self.spec.module(*args)]


def eager_generator(model: torch.nn.Module, tokenizer: Tokenizer) -> Generator:
    runner = EagerRunner(model)
    context = model.config.max_seq_len if isinstance(model.config, GPTConfig) else None
    generation = default_generation_config(tokenizer, context)
    return Generator(runner, runner.spec.signature(), tokenizer, generation, backend="eager")


def load_eager(checkpoint: str | Path, device: str = "cpu") -> Generator:
    """A Generator running a checkpoint in eager PyTorch."""
    model, tokenizer = load_checkpoint(checkpoint, device=device)
    return eager_generator(model, tokenizer)
