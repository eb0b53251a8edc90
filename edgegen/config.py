"""Model configurations: one dataclass per family, named size presets, JSON round trip.

Torch-free: the runtime reads these from a bundle's manifest.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgegen.errors import ConfigError

BYTE_VOCAB_SIZE = 259  # 256 bytes + BOS, EOS, PAD (see tokenizer.py)

RNN_CELLS = ("rnn", "gru", "lstm")
POS_ENCODINGS = ("learned", "rope", "sinusoidal", "none")
NORM_POSITIONS = ("pre", "post")
RNN_NONLINEARITIES = ("tanh", "relu")
MLP_KINDS = ("plain", "gated")
ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "relu")
NORMS = ("layernorm", "rmsnorm")


@dataclass
class GPTConfig:
    """A decoder-only Transformer with a KV cache. The defaults are edgegen's own trained
    GPT; the other choices describe imported ones (GPT-2: learned positions, biases,
    tanh GELU; Llama: RMSNorm, rotary positions, a gated SiLU MLP, grouped-query heads;
    PyTorch's nn.TransformerEncoder: post-norm, ReLU, biases everywhere, sinusoidal
    positions, embeddings scaled by sqrt(dim))."""

    vocab_size: int = BYTE_VOCAB_SIZE
    dim: int = 64  # model width
    n_layers: int = 2
    n_heads: int = 4  # query heads; dim must divide by n_heads
    n_kv_heads: int | None = None  # key/value heads (grouped-query); None = n_heads
    max_seq_len: int = 128  # context length: positions 0 .. max_seq_len-1
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * dim, unless hidden_dim is set
    hidden_dim: int | None = None  # MLP hidden width, when it is not a multiple of dim
    mlp: str = "plain"  # "plain": down(act(up x)); "gated": down(act(gate x) * up x)
    activation: str = "gelu"  # "gelu" (exact), "gelu_tanh", "silu" or "relu"
    norm: str = "layernorm"  # "layernorm" (with bias) or "rmsnorm"
    norm_position: str = "pre"  # "pre": x + f(norm(x)); "post": norm(x + f(x))
    final_norm: bool = True  # a norm before the head
    bias: bool = False  # biases in the attention and MLP projections
    head_bias: bool = False  # a bias in the output head
    pos_encoding: str = "learned"  # "learned" table, "rope" (rotary), "sinusoidal" or "none"
    embed_scale: float = 1.0  # token embeddings are multiplied by it (sqrt(dim) in some)
    rope_theta: float = 10000.0
    tie_embeddings: bool = True  # output head shares the token embedding
    dropout: float = 0.0
    norm_eps: float = 1e-5
    head_dim: int = dataclasses.field(init=False)  # derived: dim // n_heads
    kv_heads: int = dataclasses.field(init=False)  # derived: n_kv_heads or n_heads
    mlp_dim: int = dataclasses.field(init=False)  # derived: hidden_dim or mlp_ratio * dim

    family = "gpt"

    def __post_init__(self) -> None:
        _require_positive(self, "vocab_size", "dim", "n_layers", "n_heads", "max_seq_len")
        _require_positive(self, "mlp_ratio", "norm_eps", "rope_theta")
        if self.dim % self.n_heads:
            raise ConfigError(f"dim ({self.dim}) must be a multiple of n_heads ({self.n_heads})")
        for name, choices in (
            ("pos_encoding", POS_ENCODINGS),
            ("norm_position", NORM_POSITIONS),
            ("mlp", MLP_KINDS),
            ("activation", ACTIVATIONS),
            ("norm", NORMS),
        ):
            if getattr(self, name) not in choices:
                raise ConfigError(
                    f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}"
                )
        self.head_dim = self.dim // self.n_heads
        self.kv_heads = self.n_heads if self.n_kv_heads is None else self.n_kv_heads
        if not 0 < self.kv_heads <= self.n_heads or self.n_heads % self.kv_heads:
            raise ConfigError(f"n_kv_heads ({self.kv_heads}) must divide n_heads ({self.n_heads})")
        self.mlp_dim = self.mlp_ratio * self.dim if self.hidden_dim is None else self.hidden_dim
        _require_positive(self, "mlp_dim")
        if self.pos_encoding == "rope" and self.head_dim % 2:
            raise ConfigError(f"rope needs an even head_dim, got {self.head_dim}")
        if self.pos_encoding == "sinusoidal" and self.dim % 2:
            raise ConfigError(f"sinusoidal positions need an even dim, got {self.dim}")
        if not math.isfinite(self.embed_scale):
            raise ConfigError(f"embed_scale must be finite, got {self.embed_scale}")
        _require_dropout(self.dropout)


@dataclass
class RNNConfig:
    """An embedding, a multi-layer RNN/GRU/LSTM and a linear head."""

    vocab_size: int = BYTE_VOCAB_SIZE
    cell: str = "gru"  # "rnn", "gru" or "lstm"
    nonlinearity: str = "tanh"  # the "rnn" cell's: "tanh" or "relu"
    dim: int = 64  # embedding width
    hidden_size: int = 128
    n_layers: int = 2
    tie_embeddings: bool = False  # needs dim == hidden_size
    dropout: float = 0.0  # on embeddings, between layers and before the head

    family = "rnn"

    def __post_init__(self) -> None:
        _require_positive(self, "vocab_size", "dim", "hidden_size", "n_layers")
        if self.cell not in RNN_CELLS:
            raise ConfigError(f"cell must be one of {', '.join(RNN_CELLS)}, got {self.cell!r}")
        if self.nonlinearity not in RNN_NONLINEARITIES or (
            self.cell != "rnn" and self.nonlinearity != "tanh"
        ):
            raise ConfigError(
                f"nonlinearity must be one of {', '.join(RNN_NONLINEARITIES)} "
                f"(and tanh for a {self.cell} cell), got {self.nonlinearity!r}"
            )
        if self.tie_embeddings and self.dim != self.hidden_size:
            raise ConfigError(
                f"tie_embeddings needs dim == hidden_size, got {self.dim} and {self.hidden_size}"
            )
        _require_dropout(self.dropout)


ModelConfig = GPTConfig | RNNConfig
FAMILIES: dict[str, type[GPTConfig] | type[RNNConfig]] = {"gpt": GPTConfig, "rnn": RNNConfig}

# Sizes the benchmarks rely on: tiny (tests, well under 1M parameters), small
# (about 3M: fits in a CPU cache), base (25-35M: larger than any cache).
# RNN hidden sizes differ per cell so every cell lands near the same size.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "gpt": {
        "tiny": dict(dim=64, n_layers=2, n_heads=4, max_seq_len=128),
        "small": dict(dim=192, n_layers=6, n_heads=6, max_seq_len=256),
        "base": dict(dim=512, n_layers=8, n_heads=8, max_seq_len=1024),
    },
    "rnn": {
        "tiny": dict(dim=64, n_layers=2, hidden_size={"rnn": 192, "gru": 128, "lstm": 112}),
        "small": dict(dim=256, n_layers=2, hidden_size={"rnn": 896, "gru": 512, "lstm": 448}),
        "base": dict(dim=512, n_layers=3, hidden_size={"rnn": 2304, "gru": 1280, "lstm": 1152}),
    },
}


def preset(family: str, name: str = "tiny", **overrides: Any) -> ModelConfig:
    """The named size preset of a family, with any field overridden."""
    if family not in FAMILIES:
        raise ConfigError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    if name not in PRESETS[family]:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS[family])}")
    fields = dict(PRESETS[family][name])
    if family == "rnn":
        cell = overrides.get("cell", "gru")
        if cell not in RNN_CELLS:
            raise ConfigError(f"cell must be one of {', '.join(RNN_CELLS)}, got {cell!r}")
        fields["hidden_size"] = fields["hidden_size"][cell]
    fields.update(overrides)
    return config_from_dict({"family": family, **fields})


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    return {"family": config.family, **fields}


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    if not isinstance(data, dict):
        raise ConfigError("a model config must be a JSON object")
    data = dict(data)
    family = data.pop("family", None)
    if not isinstance(family, str) or family not in FAMILIES:
        raise ConfigError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    cls = FAMILIES[family]
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown {family} config field(s): {', '.join(unknown)}")
    for name, value in data.items():
        _check_type(name, value, known[name].type)
    return cls(**data)


def save_config(config: ModelConfig, path: Path) -> None:
    Path(path).write_text(json.dumps(config_to_dict(config), indent=2) + "\n")


def load_config(path: Path) -> ModelConfig:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read model config {path}: {e}") from None
    return config_from_dict(data)


def parse_override(text: str) -> tuple[str, Any]:
    """`name=value` from the command line; the value is read as JSON when it parses."""
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise ConfigError(f"override must look like name=value, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return name.strip(), value


def _check_type(name: str, value: Any, annotation: Any) -> None:
    annotation = str(annotation)
    if annotation.endswith(" | None"):
        if value is None:
            return
        annotation = annotation.removesuffix(" | None")
    expected = {"int": int, "float": (int, float), "bool": bool, "str": str}.get(annotation)
    if expected is None:
        return
    wrong_bool = isinstance(value, bool) and annotation != "bool"
    if wrong_bool or not isinstance(value, expected):
        raise ConfigError(f"config field {name} must be {annotation}, got {value!r}")


def _require_positive(config: Any, *names: str) -> None:
    for name in names:
        if not getattr(config, name) > 0:  # NaN fails too
            raise ConfigError(f"{name} must be positive, got {getattr(config, name)}")


def _require_dropout(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {p}")
