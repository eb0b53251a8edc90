"""What a family's step function looks like from outside: I/O names, dtypes, symbolic
dims, state pairs, and how to make inputs for it. Export, parity and the manifest
all read this; the model code knows nothing of it.

    GPT  input_ids[batch,seq] position_ids[batch,seq] attention_mask[batch,total]
         past_key_values.{i}.key|value[batch,kv_heads,past,head_dim]
      -> logits[batch,seq,vocab] present.{i}.key|value[batch,kv_heads,past,head_dim]
    RNN  input_ids[batch,seq] state.h[layers,batch,hidden] (state.c for LSTM)
      -> logits[batch,seq,vocab] state_out.h (state_out.c)

An RNN's state outputs replace its state inputs. A GPT's state is a KV buffer the
runtime preallocates: `past` counts its slots, and `attention_mask` [batch, total]
covers its first `total` slots, 1 where a slot holds a real token. The step's new
tokens go to the last `seq` of those slots, and `present` is the same buffer with
their keys and values written there (padding slots, and slots from `total` on, are
unspecified). The runtime binds each present to its past, so ONNX Runtime's
attention kernel writes the new slots in place and reads only the first `total`
(the eager and traced step read the whole buffer, masked): nothing copies the cache
per token. A step of several tokens after a past is one row
at a time (that kernel allows no more); prefill of a padded batch and batched
decoding are not limited.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgegen.config import GPTConfig
from edgegen.models import GPT, RNNLM
from edgegen.models.gpt import attention_bias


class GPTStep(nn.Module):
    """GPT with positional step inputs (input_ids, position_ids, attention_mask, *buffers):
    each buffer [B, kv_heads, slots, hs] is the past, its slots from the mask's width on
    masked, and the new tokens' keys and values are written into it in place, at the
    mask's last `seq` slots; the buffers come back as the new state. Attending over the
    whole buffer keeps every shape fixed from one step to the next (TorchScript
    specialises on shapes); the attention is the model's own (`models.gpt.attend`)."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, attention_mask, *buffers):
        seq, slots = input_ids.shape[1], buffers[0].shape[2]
        past_len = attention_mask.shape[1] - seq
        past_mask = F.pad(attention_mask[:, :past_len], (0, slots - past_len))
        mask = torch.cat([past_mask, attention_mask[:, past_len:]], dim=1)  # [B, slots + seq]
        bias = attention_bias(seq, slots, mask, input_ids.device)
        logits, *new = self.model.step(input_ids, position_ids, bias, *buffers)
        for buffer, keys in zip(buffers, new, strict=True):
            buffer[:, :, past_len : past_len + seq] = keys
        return (logits, *buffers)

    def init_state(self, batch: int, slots: int = 0) -> tuple[torch.Tensor, ...]:
        cfg = self.model.config
        return tuple(
            torch.zeros(batch, cfg.kv_heads, slots, cfg.head_dim) for _ in self.model.state_names
        )


class RNNStep(nn.Module):
    def __init__(self, model: RNNLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, *state):
        return self.model(input_ids, *state)


@dataclass
class StepSpec:
    module: nn.Module  # the step as a module with positional inputs, in eval mode
    inputs: list[dict[str, Any]]  # {"name", "dtype", "shape"}; state inputs last
    outputs: list[dict[str, Any]]  # logits first, then the new state in the same order
    n_state: int
    layout: dict[str, Any] = field(default_factory=dict)  # family facts the runtime needs

    @property
    def input_names(self) -> list[str]:
        return [io["name"] for io in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [io["name"] for io in self.outputs]

    @property
    def example_vocab(self) -> int:
        """Example token ids are drawn below this: byte ids, or fewer in a word-level
        vocabulary smaller than 256."""
        return min(256, self.outputs[0]["shape"][2])

    @property
    def is_gpt(self) -> bool:
        return isinstance(self.module, GPTStep)

    def signature(self) -> dict[str, Any]:
        state_in = self.inputs[-self.n_state :]
        state_out = self.outputs[-self.n_state :]
        return {
            "inputs": self.inputs,
            "outputs": self.outputs,
            "state": [
                {"input": i["name"], "output": o["name"]}
                for i, o in zip(state_in, state_out, strict=True)
            ],
            "dims": DIMS,
            "layout": self.layout,
        }

    def dynamic_shapes(self) -> tuple:
        """torch.export's dynamic shapes, shaped like the step's (args, *state) signature."""
        dynamic = [
            {
                axis: torch.export.Dim.DYNAMIC
                for axis, d in enumerate(io["shape"])
                if isinstance(d, str)
            }
            for io in self.inputs
        ]
        return (*dynamic[: -self.n_state], tuple(dynamic[-self.n_state :]))

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """The legacy exporter's dynamic axes: every named dim of every input and output."""
        return {
            io["name"]: {axis: d for axis, d in enumerate(io["shape"]) if isinstance(d, str)}
            for io in self.inputs + self.outputs
        }

    def example(self, batch: int, seq: int, past: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """Step inputs with a real state: the eager model's state after `past` tokens.

        GPT rows after the first are left-padded by a few tokens, so padding is always
        exercised when batch > 1.
        """
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, self.example_vocab, (batch, past + seq), generator=gen)
        if self.is_gpt:
            return self._gpt_example(ids, past, gen)
        model = self.module.model
        state = model.init_state(batch)
        if past:
            with torch.no_grad():
                _, *state = model(ids[:, :past].contiguous(), *state)
        return dict(zip(self.input_names, (ids[:, past:].contiguous(), *state), strict=True))

    def _gpt_example(self, ids: torch.Tensor, past: int, gen) -> dict[str, torch.Tensor]:
        batch, total = ids.shape
        seq = total - past
        mask = torch.ones(batch, total, dtype=torch.int64)
        for row in range(1, batch):
            mask[row, : min(2 * row, total - 1)] = 0  # keep at least one real token per row
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        model = self.module.model
        cfg = model.config
        # the buffer: the past, two unused slots and the new tokens' slots (all garbage
        # but the past: the mask hides them, the step overwrites its own), and three
        # spare slots past the mask's width
        gap, spare = (2, 3) if past else (0, 3)
        slots = past + gap + seq + spare
        state = [
            torch.randn((batch, cfg.kv_heads, slots, cfg.head_dim), generator=gen)
            for _ in model.state_names
        ]
        if past:
            with torch.no_grad():
                _, *filled = model(
                    ids[:, :past].contiguous(),
                    position_ids=positions[:, :past].contiguous(),
                    attention_mask=mask[:, :past].contiguous(),
                )
            for buffer, keys in zip(state, filled, strict=True):
                buffer[:, :, :past] = keys
            empty = torch.zeros(batch, gap, dtype=torch.int64)
            mask = torch.cat([mask[:, :past], empty, mask[:, past:]], dim=1)
        values = (ids[:, past:].contiguous(), positions[:, past:].contiguous(), mask, *state)
        return dict(zip(self.input_names, values, strict=True))

    def prefill_feeds(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Inputs for reading whole rows `ids` [B, T] from an empty state."""
        batch, seq = ids.shape
        ids = ids.contiguous()  # quantized embeddings insist
        if not self.is_gpt:
            state = self.module.model.init_state(batch)
            return dict(zip(self.input_names, (ids, *state), strict=True))
        state = self.module.init_state(batch, slots=seq)
        positions = torch.arange(seq).expand(batch, seq).contiguous()
        mask = torch.ones(batch, seq, dtype=torch.int64)
        return dict(zip(self.input_names, (ids, positions, mask, *state), strict=True))

    def model_logits(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        """The original model's logits for step inputs with an empty state: the reference
        that proves the step module itself, not only its export."""
        model = self.module.model
        with torch.no_grad():
            if self.is_gpt:
                return model(
                    feeds["input_ids"],
                    position_ids=feeds["position_ids"],
                    attention_mask=feeds["attention_mask"],
                )[0]
            return model(*feeds.values())[0]


DIMS = {
    "batch": "sequences in the batch",
    "seq": "tokens fed in this step (prompt length at prefill, 1 when decoding)",
    "past": "slots in the KV buffer",
    "total": "slots the attention mask covers: those before the new tokens, plus seq",
}


def step_spec(model: GPT | RNNLM) -> StepSpec:
    model = model.eval()
    cfg = model.config
    logits = {"name": "logits", "dtype": "float32", "shape": ["batch", "seq", cfg.vocab_size]}
    ids = {"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]}
    if isinstance(cfg, GPTConfig):
        kv = ["batch", cfg.kv_heads, "past", cfg.head_dim]
        layers = [(i, part) for i in range(cfg.n_layers) for part in ("key", "value")]
        inputs = [
            ids,
            {"name": "position_ids", "dtype": "int64", "shape": ["batch", "seq"]},
            {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "total"]},
        ] + [
            {"name": f"past_key_values.{i}.{p}", "dtype": "float32", "shape": kv} for i, p in layers
        ]
        outputs = [logits] + [
            {"name": f"present.{i}.{p}", "dtype": "float32", "shape": kv} for i, p in layers
        ]
        layout = {
            "kind": "kv_cache",
            "update": "in_place",  # present.{i} is past.{i} with the new slots written
            "kv_axes": ["batch", "heads", "seq", "head_dim"],
            "n_layers": cfg.n_layers,
            "n_heads": cfg.n_heads,
            "n_kv_heads": cfg.kv_heads,  # heads in the cache (fewer with grouped-query attention)
            "head_dim": cfg.head_dim,
            "seq_axis": 2,
            "max_seq_len": cfg.max_seq_len,
        }
        return StepSpec(GPTStep(model).eval(), inputs, outputs, len(layers), layout)
    shape = [cfg.n_layers, "batch", cfg.hidden_size]
    names = model.state_names
    inputs = [ids] + [{"name": f"state.{n}", "dtype": "float32", "shape": shape} for n in names]
    outputs = [logits] + [
        {"name": f"state_out.{n}", "dtype": "float32", "shape": shape} for n in names
    ]
    layout = {
        "kind": "recurrent",
        "cell": cfg.cell,
        "n_layers": cfg.n_layers,
        "hidden_size": cfg.hidden_size,
    }
    return StepSpec(RNNStep(model).eval(), inputs, outputs, len(names), layout)
