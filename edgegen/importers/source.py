"""What every importer reads a foreign model into, before it becomes a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class ForeignModel:
    """A pretrained model in Hugging Face's terms, whatever file it came from."""

    config: dict[str, Any]  # config.json fields: model_type, hidden_size, num_key_value_heads...
    tensors: dict[str, np.ndarray]  # HF parameter names and layouts (Linear: [out, in])
    tokenizer_json: str  # the text of a Hugging Face tokenizer.json
    tokenizer_config: dict[str, Any] = field(default_factory=dict)  # bos/eos/add_bos/chat_template
    generation_config: dict[str, Any] = field(default_factory=dict)  # eos_token_id, ...
    source: str = ""  # where it came from, for messages
