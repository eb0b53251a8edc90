"""Eager PyTorch behind the runtime's step interface: the oracle and the baseline."""

from __future__ import annotations

import numpy as np
import torch

from edgegen.config import GPTConfig
from edgegen.errors import GenerationError
from edgegen.runtime import Sampler, generate_ids
from edgegen.tokenizer import Tokenizer

DEFAULT_NEW_TOKENS = 120


class EagerBackend:
    """Runs a model's step function and keeps its state between calls."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.state: tuple[torch.Tensor, ...] = ()

    @torch.inference_mode()
    def prefill(self, input_ids: np.ndarray) -> np.ndarray:
        logits, *state = self.model(torch.from_numpy(input_ids).to(self.device))
        self.state = tuple(state)
        return logits[:, -1].float().cpu().numpy()

    @torch.inference_mode()
    def decode_one_token(self, token_ids: np.ndarray) -> np.ndarray:
        ids = torch.from_numpy(token_ids).to(self.device)[:, None]  # (B, 1)
        logits, *state = self.model(ids, *self.state)
        self.state = tuple(state)
        return logits[:, -1].float().cpu().numpy()


def generate_text(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    prompt: str,
    sampler: Sampler,
    max_new_tokens: int | None = None,
) -> str:
    """The continuation of `prompt` (which starts a document, so it follows BOS).

    `max_new_tokens=None` means DEFAULT_NEW_TOKENS, or fewer if the context ends first.
    """
    prompt_ids = tokenizer.encode(prompt, bos=True)
    config = model.config
    if max_new_tokens is None:
        room = config.max_seq_len - len(prompt_ids) if isinstance(config, GPTConfig) else None
        max_new_tokens = (
            DEFAULT_NEW_TOKENS if room is None else max(0, min(DEFAULT_NEW_TOKENS, room))
        )
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if isinstance(config, GPTConfig) and len(prompt_ids) + max_new_tokens > config.max_seq_len:
        raise GenerationError(
            f"prompt ({len(prompt_ids)} tokens) plus max_new_tokens ({max_new_tokens}) "
            f"exceeds the model's context of {config.max_seq_len} tokens"
        )
    new_ids = generate_ids(
        EagerBackend(model), prompt_ids, sampler, max_new_tokens, eos_id=tokenizer.eos_id
    )
    return tokenizer.decode(new_ids)
