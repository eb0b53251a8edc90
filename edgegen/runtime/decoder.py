"""Prefill and decode over any backend's step function, driven by the step signature.

A backend only runs one step: `run(feeds) -> outputs` (numpy in, numpy out, in
signature order). The Decoder owns the run state between steps: the model state
(KV cache or hidden state) and, for KV-cache models, the attention mask and
positions. It never knows which backend it drives.

Ragged batches: GPT prompts are left-padded, masked and positioned so that every
row computes what it would alone. An RNN cannot skip padding, so each RNN prompt
is prefilled alone and the final states are stacked for batched decoding.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

_NP_DTYPES = {"int64": np.int64, "float32": np.float32}


class StepRunner(Protocol):
    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


class Decoder:
    def __init__(self, runner: StepRunner, signature: dict[str, Any], pad_id: int) -> None:
        self.runner, self.signature, self.pad_id = runner, signature, pad_id
        self.inputs = {io["name"]: io for io in signature["inputs"]}
        self.state_inputs = [pair["input"] for pair in signature["state"]]
        self.n_state = len(self.state_inputs)
        self.kv_cache = signature["layout"]["kind"] == "kv_cache"
        self.state: list[np.ndarray] = []
        self.mask: np.ndarray | None = None
        self.positions: np.ndarray | None = None

    def prefill(self, prompts: list[list[int]]) -> np.ndarray:
        """Start a batch: logits after each prompt's last token, [B, V]."""
        if self.kv_cache:
            return self._prefill_padded(prompts)
        logits, states = [], []
        for prompt in prompts:
            outputs = self._run(np.asarray([prompt], dtype=np.int64), self.initial_state(1))
            logits.append(outputs[0][:, -1])
            states.append(outputs[1:])
        batch_axis = self._batch_axis()
        self.state = [np.concatenate(parts, axis=batch_axis) for parts in zip(*states, strict=True)]
        return np.concatenate(logits, axis=0)

    def decode_one_token(self, tokens: np.ndarray) -> np.ndarray:
        """Append one token per row: logits [B, V]."""
        ids = np.asarray(tokens, dtype=np.int64)[:, None]  # (B, 1)
        if self.kv_cache:
            self.mask = np.concatenate([self.mask, np.ones_like(ids)], axis=1)
            self.positions = self.positions + 1
        outputs = self._run(ids, self.state)
        self.state = outputs[1:]
        return outputs[0][:, -1]

    def initial_state(self, batch: int) -> list[np.ndarray]:
        state = []
        for name in self.state_inputs:
            io = self.inputs[name]
            shape = [batch if d == "batch" else 0 if d == "past" else d for d in io["shape"]]
            state.append(np.zeros(shape, dtype=_NP_DTYPES[io["dtype"]]))
        return state

    def _prefill_padded(self, prompts: list[list[int]]) -> np.ndarray:
        width = max(len(p) for p in prompts)
        ids = np.full((len(prompts), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(prompts), width), dtype=np.int64)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = prompt
            mask[row, width - len(prompt) :] = 1
        self.mask = mask
        positions = np.maximum(mask.cumsum(axis=1) - 1, 0)  # a padded row starts at 0
        self.positions = positions[:, -1:]
        outputs = self._run(ids, self.initial_state(len(prompts)), positions)
        self.state = outputs[1:]
        return outputs[0][:, -1]

    def _run(self, ids: np.ndarray, state: list[np.ndarray], positions=None) -> list[np.ndarray]:
        feeds = {"input_ids": ids}
        if self.kv_cache:
            feeds["position_ids"] = self.positions if positions is None else positions
            feeds["attention_mask"] = self.mask
        feeds.update(zip(self.state_inputs, state, strict=True))
        return self.runner.run(feeds)

    def _batch_axis(self) -> int:
        return self.inputs[self.state_inputs[0]]["shape"].index("batch")
