"""Prefill and decode over any backend's step function, driven by the step signature.

A backend only runs one step: `run(feeds) -> outputs` (numpy in, numpy out, in
signature order). The Decoder owns the run state between steps: the model state
(KV cache or hidden state) and, for KV-cache models, the attention mask and
positions. It never knows which backend it drives.

KV cache: the Decoder preallocates buffers [batch, heads, capacity, head_dim] and
feeds them whole, with an attention mask over the slots up to and including the
new tokens' (1 for a real token); the step writes the new keys and values into the
buffers in place and returns them as its state (backends bind each present output
to its past input); ONNX attention reads only the slots the mask covers. Per token
nothing is copied but the new slots. A full buffer doubles (amortised, rare).

Ragged batches: GPT prompts are left-padded, masked and positioned so that every
row computes what it would alone. An RNN cannot skip padding, so each RNN prompt
is prefilled alone and the final states are stacked for batched decoding.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

_NP_DTYPES = {"int64": np.int64, "float32": np.float32}
_MIN_CAPACITY = 64


def in_place_state(signature: dict[str, Any]) -> dict[str, str]:
    """The state inputs a step updates in place, each with the output that returns it."""
    if signature["layout"].get("update") != "in_place":
        return {}
    return {pair["input"]: pair["output"] for pair in signature["state"]}


class StepRunner(Protocol):
    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


class Decoder:
    def __init__(
        self,
        runner: StepRunner,
        signature: dict[str, Any],
        pad_id: int,
        capacity: int = _MIN_CAPACITY,  # KV slots of the first buffer (more if a prompt needs)
    ) -> None:
        self.runner, self.signature, self.pad_id = runner, signature, pad_id
        self.first_capacity = capacity
        self.inputs = {io["name"]: io for io in signature["inputs"]}
        self.state_inputs = [pair["input"] for pair in signature["state"]]
        self.n_state = len(self.state_inputs)
        self.kv_cache = signature["layout"]["kind"] == "kv_cache"
        self.state: list[np.ndarray] = []  # recurrent state, or the KV buffers
        self.length = 0  # KV slots filled
        self.axis = self.inputs[self.state_inputs[0]]["shape"].index("past") if self.kv_cache else 0
        self.mask = np.zeros((0, 0), dtype=np.int64)  # KV: [batch, capacity], 1 for a real token
        self.positions: np.ndarray | None = None
        self._ids = np.zeros((0, 1), dtype=np.int64)

    @property
    def capacity(self) -> int:
        """KV slots in the buffers now (0 for recurrent state)."""
        return self.state[0].shape[self.axis] if self.kv_cache and self.state else 0

    def prefill(self, prompts: list[list[int]]) -> np.ndarray:
        """Start a batch: logits after each prompt's last token, [B, V]."""
        if self.kv_cache:
            return self._prefill_padded(prompts)
        self._ids = np.zeros((len(prompts), 1), dtype=np.int64)
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
        ids = self._ids
        ids[:, 0] = tokens
        if not self.kv_cache:
            outputs = self._run(ids, self.state)
            self.state = outputs[1:]
            return outputs[0][:, -1]
        if self.length == self.state[0].shape[self.axis]:
            self._reserve(self.length + 1)
        self.positions += 1
        return self._step_kv(ids, self.positions, self._ones)

    def initial_state(self, batch: int) -> list[np.ndarray]:
        state = []
        for name in self.state_inputs:
            io = self.inputs[name]
            shape = [batch if d == "batch" else 0 if d == "past" else d for d in io["shape"]]
            state.append(np.zeros(shape, dtype=_NP_DTYPES[io["dtype"]]))
        return state

    def _prefill_padded(self, prompts: list[list[int]]) -> np.ndarray:
        batch, width = len(prompts), max(len(p) for p in prompts)
        ids = np.full((batch, width), self.pad_id, dtype=np.int64)
        mask = np.zeros((batch, width), dtype=np.int64)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = prompt
            mask[row, width - len(prompt) :] = 1
        self.state, self.length = self.initial_state(batch), 0
        self.mask = np.zeros((batch, 0), dtype=np.int64)
        self._ids = np.zeros((batch, 1), dtype=np.int64)
        self._ones = np.ones((batch, 1), dtype=np.int64)
        self._reserve(width)
        positions = np.maximum(mask.cumsum(axis=1) - 1, 0)  # a padded row starts at 0
        self.positions = positions[:, -1:].copy()
        return self._step_kv(ids, positions, mask)

    def _step_kv(self, ids, positions, real) -> np.ndarray:
        """One step: the new tokens take the next slots, marked by `real` [B, T]; the
        backend writes their keys and values into the buffers it returns."""
        start, end = self.length, self.length + ids.shape[1]
        self.mask[:, start:end] = real
        feeds = {"input_ids": ids, "position_ids": positions, "attention_mask": self.mask[:, :end]}
        feeds.update(zip(self.state_inputs, self.state, strict=True))
        outputs = self.runner.run(feeds)
        self.state = outputs[1:]
        self.length = end
        return outputs[0][:, -1]

    def _reserve(self, needed: int) -> None:
        """Grow the KV buffers and the mask (doubling) to hold `needed` slots."""
        axis, capacity = self.axis, self.state[0].shape[self.axis]
        if needed <= capacity:
            return
        capacity = max(self.first_capacity, capacity, 1)
        while capacity < needed:
            capacity *= 2
        filled = (slice(None),) * axis + (slice(0, self.length),)
        grown = []
        for buffer in self.state:
            shape = list(buffer.shape)
            shape[axis] = capacity
            bigger = np.zeros(shape, dtype=buffer.dtype)  # empty slots hold zeros, masked
            bigger[filled] = buffer[filled]
            grown.append(bigger)
        self.state = grown
        mask = np.zeros((self.mask.shape[0], capacity), dtype=np.int64)
        mask[:, : self.length] = self.mask[:, : self.length]
        self.mask = mask

    def _run(self, ids: np.ndarray, state: list[np.ndarray]) -> list[np.ndarray]:
        return self.runner.run(
            {"input_ids": ids, **dict(zip(self.state_inputs, state, strict=True))}
        )

    def _batch_axis(self) -> int:
        return self.inputs[self.state_inputs[0]]["shape"].index("batch")
