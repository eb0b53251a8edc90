"""PyTorch models implementing the step contract:

    init_state(batch_size) -> state
    forward(input_ids[B,T], *state) -> (logits[B,T,V], *new_state)

Model code never knows about export; export wraps these modules.
"""

from __future__ import annotations

import torch

from edgegen.config import GPTConfig, ModelConfig, RNNConfig
from edgegen.models.gpt import GPT
from edgegen.models.rnn import RNNLM

__all__ = ["GPT", "RNNLM", "build_model", "count_parameters"]


def build_model(config: ModelConfig) -> GPT | RNNLM:
    if isinstance(config, GPTConfig):
        return GPT(config)
    if isinstance(config, RNNConfig):
        return RNNLM(config)
    raise TypeError(f"not a model config: {config!r}")


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (a tied head counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
