"""Decoder-only Transformer (causal self-attention with a KV cache, MLP; pre- or
post-norm), configured rather than copied: edgegen's own GPT, GPT-2, Llama and a
causal nn.TransformerEncoder language model are one model.

State is the KV cache as a flat tuple `(k0, v0, k1, v1, ...)`, each [B, kv_heads,
past, head_dim]. `forward` appends the new keys and values and returns the grown
cache, so prefill (T > 1, empty cache), decode (T = 1) and one full forward are
the same function; `step` returns only the new keys and values (the export's
contract) and is what `forward` runs. Left-padded batches pass `attention_mask` [B, past+T] (1 for
a real token, 0 for padding) and, optionally, `position_ids` [B, T].
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from edgegen.config import GPTConfig


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.dim)
        self.pos_emb = (
            nn.Embedding(config.max_seq_len, config.dim)
            if config.pos_encoding == "learned"
            else None
        )
        self.rope = (
            Rotary(config.head_dim, config.rope_theta) if config.pos_encoding == "rope" else None
        )
        self.sinusoidal = Sinusoidal(config.dim) if config.pos_encoding == "sinusoidal" else None
        self.embed_scale = config.embed_scale
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = make_norm(config) if config.final_norm else nn.Identity()
        self.head = nn.Linear(config.dim, config.vocab_size, bias=config.head_bias)
        if config.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        self.apply(_init_weights)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):  # residual projections, scaled as in GPT-2
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    @property
    def state_names(self) -> tuple[str, ...]:
        return tuple(f"{i}.{kv}" for i in range(self.config.n_layers) for kv in ("key", "value"))

    def init_state(self, batch_size: int, device: torch.device | None = None):
        cfg = self.config
        device = device or next((p.device for p in self.parameters()), torch.device("cpu"))
        empty = torch.zeros(batch_size, cfg.kv_heads, 0, cfg.head_dim, device=device)
        return tuple(empty.clone() for _ in self.state_names)

    def forward(
        self,
        input_ids: torch.Tensor,
        *past_key_values: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ):
        """input_ids [B,T] -> (logits [B,T,V], *present_key_values): the grown cache."""
        B, T = input_ids.shape
        if not past_key_values:
            past_key_values = self.init_state(B, input_ids.device)
        past_len = past_key_values[0].shape[2]
        if position_ids is None:
            position_ids = default_position_ids(B, T, past_len, attention_mask, input_ids.device)
        bias = attention_bias(T, past_len, attention_mask, input_ids.device)
        logits, *new = self.step(input_ids, position_ids, bias, *past_key_values)
        present = [torch.cat([p, n], dim=2) for p, n in zip(past_key_values, new, strict=True)]
        return (logits, *present)

    def step(self, input_ids, position_ids, bias, *past_key_values):
        """The step every path runs (training, eager, export, parity): logits and the new
        tokens' keys and values [B, kv_heads, T, head_dim]; the past is only read."""
        x = self.tok_emb(input_ids)  # (B, T, dim)
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        if self.pos_emb is not None:
            x = x + self.pos_emb(position_ids)
        if self.sinusoidal is not None:
            x = x + self.sinusoidal(position_ids)
        rope = self.rope(position_ids) if self.rope is not None else None
        x = self.drop(x)
        new = []
        for i, block in enumerate(self.blocks):
            x, k, v = block(x, past_key_values[2 * i], past_key_values[2 * i + 1], bias, rope)
            new += [k, v]
        return (self.head(self.norm(x)), *new)


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.norm2 = make_norm(config)
        self.mlp = MLP(config)
        self.post_norm = config.norm_position == "post"

    def forward(self, x, past_k, past_v, bias, rope):
        if self.post_norm:  # the original Transformer's (nn.TransformerEncoderLayer's default)
            a, k, v = self.attn(x, past_k, past_v, bias, rope)
            x = self.norm1(x + a)
            return self.norm2(x + self.mlp(x)), k, v
        a, k, v = self.attn(self.norm1(x), past_k, past_v, bias, rope)
        x = x + a
        x = x + self.mlp(self.norm2(x))
        return x, k, v


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = (
            config.n_heads,
            config.kv_heads,
            config.head_dim,
        )
        kv_dim = config.kv_heads * config.head_dim
        self.sizes = [config.dim, kv_dim, kv_dim]  # q, k, v: one matmul for all three
        self.qkv = nn.Linear(config.dim, sum(self.sizes), bias=config.bias)
        self.proj = nn.Linear(config.dim, config.dim, bias=config.bias)
        self.dropout = config.dropout
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x, past_k, past_v, bias, rope):
        q, k, v = self.heads(x, rope)
        dropout = self.dropout if self.training else 0.0
        y = attend(q, k, v, past_k, past_v, bias, dropout)
        return self.output(y), k, v

    def heads(self, x, rope):
        """x (B, T, dim) -> q (B, nh, T, hs), k and v (B, kvh, T, hs), rotated by `rope`."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(self.sizes, dim=2)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = rope(q), rope(k)
        return q, k, v

    def output(self, y):
        """The heads' attention (B, nh, T, hs) -> the layer's output (B, T, dim)."""
        B, _, T, _ = y.shape
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, -1)))


def attend(q, k, v, past_k, past_v, bias, dropout: float = 0.0) -> torch.Tensor:
    """Attention of q [B, nh, T, hs] over the cached keys/values [B, kvh, S, hs] and the
    new ones [B, kvh, T, hs]; `bias` is None (plain causal) or bool [B|1, 1, T, S+T].

    With a past, the cache is read in place: two matmuls under one softmax, no concat.
    Grouped-query heads stack the nh // kvh queries that share a key/value head along
    T, so each cached head is read once:

        q (B, kvh, g*T, hs) . [ K_past | K_new ]^T / sqrt(hs) + mask -> softmax -> p_past | p_new
        out = p_past . V_past + p_new . V_new                              (B, kvh, g*T, hs)

    Without a past (training, a full forward) it is the same math over the new tokens,
    left to SDPA's fused kernel.
    """
    T, group = q.shape[2], q.shape[1] // k.shape[1]
    if past_k.shape[2] == 0:
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        causal = bias is None and T > 1
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=dropout, is_causal=causal
        )
    return attend_cached(q, k, v, past_k, past_v, bias)


def attend_cached(q, k, v, past_k, past_v, bias) -> torch.Tensor:
    """attend's path with a past (which may be empty when `bias` is given)."""
    B, nh, T, hs = q.shape
    kvh, past_len = k.shape[1], past_k.shape[2]
    group = nh // kvh
    q = q.reshape(B, kvh, group * T, hs)
    scores = torch.cat([q @ past_k.transpose(-1, -2), q @ k.transpose(-1, -2)], dim=-1)
    scores = scores * (1.0 / math.sqrt(hs))  # (B, kvh, g*T, S+T)
    if bias is not None:
        scores = scores.view(B, kvh, group, T, -1).masked_fill(~bias[:, :, None], float("-inf"))
        scores = scores.view(B, kvh, group * T, -1)
    probs = torch.softmax(scores, dim=-1)
    y = probs[..., :past_len] @ past_v + probs[..., past_len:] @ v
    return y.view(B, nh, T, hs)


class MLP(nn.Module):
    """plain: proj(act(fc x)); gated (SwiGLU and kin): proj(act(gate x) * fc x)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        dim, hidden, bias = config.dim, config.mlp_dim, config.bias
        self.gate = nn.Linear(dim, hidden, bias=bias) if config.mlp == "gated" else None
        self.fc = nn.Linear(dim, hidden, bias=bias)
        self.proj = nn.Linear(hidden, dim, bias=bias)
        self.act = ACTIVATIONS[config.activation]()
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.act(self.fc(x)) if self.gate is None else self.act(self.gate(x)) * self.fc(x)
        return self.drop(self.proj(h))


ACTIVATIONS = {
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
    "relu": nn.ReLU,
}


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.dim, eps=config.norm_eps)
    return nn.LayerNorm(config.dim, eps=config.norm_eps)


class Rotary(nn.Module):
    """Rotary position embeddings: for position ids, the function that rotates a query
    or key tensor [B, heads, T, hs] to those positions (cos/sin computed from the ids)."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor):
        angles = position_ids[..., None].float() * self.inv_freq  # (B, T, hs/2)
        cos, sin = angles.cos()[:, None], angles.sin()[:, None]  # (B, 1, T, hs/2) each
        return partial(apply_rotary, cos=cos, sin=sin)


class Sinusoidal(nn.Module):
    """The fixed position table of "Attention Is All You Need", computed from position
    ids: feature 2i is sin(pos / 10000^(2i/dim)), feature 2i+1 its cos."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        inv_freq = torch.exp(torch.arange(0, dim, 2).float() * (-math.log(10000.0) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        angles = position_ids[..., None].float() * self.inv_freq  # (B, T, dim/2)
        return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # (B, T, dim)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)  # rotate the two halves of each head as pairs
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


def default_position_ids(B, T, past_len, attention_mask, device) -> torch.Tensor:
    """Positions count real tokens only, so a left-padded row starts at position 0."""
    if attention_mask is None:
        return torch.arange(past_len, past_len + T, device=device).expand(B, T)
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)[:, -T:]


def attention_bias(T: int, past_len: int, attention_mask, device) -> torch.Tensor | None:
    """Boolean mask [B|1, 1, T, past+T]: True where a query may attend to a key.

    None when plain causal attention does (no padding; SDPA then uses is_causal).
    Query i sits at cache slot past+i and sees slots <= past+i that are not
    padding. Every query also sees itself, so a padding row is never all-masked
    (which would give NaN); no real token ever attends to a padding slot.
    """
    if attention_mask is None and (past_len == 0 or T == 1):
        return None
    total = past_len + T
    query_slot = torch.arange(past_len, total, device=device)[:, None]  # (T, 1)
    key_slot = torch.arange(total, device=device)[None, :]  # (1, total)
    causal = key_slot <= query_slot  # (T, total)
    if attention_mask is None:
        return causal[None, None]
    keep = attention_mask.bool()[:, None, None, :] | (key_slot == query_slot)  # (B, 1, T, total)
    return causal & keep


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
