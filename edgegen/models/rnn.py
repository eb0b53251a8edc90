"""RNN language model: embedding -> nn.RNN (tanh or ReLU) / nn.GRU / nn.LSTM -> linear head."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from edgegen.config import RNNConfig

_CELLS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


def _cell(config: RNNConfig) -> nn.Module:
    extra = {"nonlinearity": config.nonlinearity} if config.cell == "rnn" else {}
    return _CELLS[config.cell](
        config.dim,
        config.hidden_size,
        config.n_layers,
        batch_first=True,
        dropout=config.dropout if config.n_layers > 1 else 0.0,
        **extra,
    )


class RNNLM(nn.Module):
    """State is `(h,)` for RNN/GRU and `(h, c)` for LSTM, each [n_layers, B, hidden]."""

    def __init__(self, config: RNNConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.rnn = _cell(config)
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight

    @property
    def state_names(self) -> tuple[str, ...]:
        return ("h", "c") if self.config.cell == "lstm" else ("h",)

    def init_state(self, batch_size: int, device: torch.device | None = None):
        cfg = self.config
        device = device or next((p.device for p in self.parameters()), torch.device("cpu"))
        return tuple(
            torch.zeros(cfg.n_layers, batch_size, cfg.hidden_size, device=device)
            for _ in self.state_names
        )

    def forward(self, input_ids: torch.Tensor, *state: torch.Tensor):
        """input_ids [B,T] -> (logits [B,T,V], *new_state)."""
        if not state:
            state = self.init_state(input_ids.shape[0])
        x = self.drop(self.embed(input_ids))  # (B, T, dim)
        out, new_state = self.rnn(x, self._cell_state(state))  # out: (B, T, hidden)
        return (self.head(self.drop(out)), *self._flat_state(new_state))

    def forward_packed(self, input_ids: torch.Tensor, lengths: torch.Tensor, *state: torch.Tensor):
        """Rows of different lengths, right-padded: the state stops at each row's own end.

        Returns (logits [B,T,V] with padded positions undefined, *state at each row's end).
        """
        if not state:
            state = self.init_state(input_ids.shape[0])
        x = self.drop(self.embed(input_ids))
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, new_state = self.rnn(packed, self._cell_state(state))
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=input_ids.shape[1])
        return (self.head(self.drop(out)), *self._flat_state(new_state))

    def _cell_state(self, state):
        return (state[0], state[1]) if self.config.cell == "lstm" else state[0]

    def _flat_state(self, state) -> tuple[torch.Tensor, ...]:
        return tuple(state) if self.config.cell == "lstm" else (state,)
