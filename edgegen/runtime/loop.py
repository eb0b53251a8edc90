"""One generation loop for every backend: prefill the prompt, then decode one token
at a time, sampling in between. A backend only runs steps and keeps its state."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from edgegen.runtime.sampler import Sampler


class StepBackend(Protocol):
    def prefill(self, input_ids: np.ndarray) -> np.ndarray:
        """Start a sequence: input_ids [B, T] -> logits of the last position [B, V]."""

    def decode_one_token(self, token_ids: np.ndarray) -> np.ndarray:
        """Append one token per row: token_ids [B] -> logits [B, V]."""


def generate_ids(
    backend: StepBackend,
    prompt_ids: list[int],
    sampler: Sampler,
    max_new_tokens: int,
    eos_id: int | None = None,
) -> list[int]:
    """New token ids after `prompt_ids` (batch 1), stopping at `eos_id` (not returned)."""
    logits = backend.prefill(np.asarray([prompt_ids], dtype=np.int64))
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = int(sampler(logits)[0])
        if token == eos_id:
            break
        out.append(token)
        if len(out) < max_new_tokens:
            logits = backend.decode_one_token(np.asarray([token], dtype=np.int64))
    return out
