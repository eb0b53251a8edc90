"""Hugging Face model directories in, and HF's terms mapped onto edgegen's GPT.

`read_hf_dir` reads config.json, safetensors weights (one file or shards with their
index), tokenizer.json, tokenizer_config.json (and chat_template.jinja) and
generation_config.json into a ForeignModel. `gpt_config` and `gpt_tensors` map a
ForeignModel of a supported architecture (whatever file it came from: GGUF files
are read into the same terms) onto edgegen's one GPT implementation.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgegen.config import GPTConfig, config_from_dict
from edgegen.errors import EdgegenError, ImportModelError
from edgegen.importers.source import ForeignModel

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def read_hf_dir(path: str | Path) -> ForeignModel:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ImportModelError(f"{path} is not a Hugging Face model directory: no config.json")
    config = _read_json(path / "config.json")
    if not (path / "tokenizer.json").is_file():
        raise ImportModelError(f"{path} has no tokenizer.json (edgegen reads fast tokenizers)")
    tokenizer_config = _read_json(path / "tokenizer_config.json", missing_ok=True)
    template = path / "chat_template.jinja"
    if "chat_template" not in tokenizer_config and template.is_file():
        tokenizer_config["chat_template"] = template.read_text(encoding="utf-8")
    return ForeignModel(
        config=config,
        tensors=_read_weights(path),
        tokenizer_json=_read_text(path / "tokenizer.json"),
        tokenizer_config=tokenizer_config,
        generation_config=_read_json(path / "generation_config.json", missing_ok=True),
        source=str(path),
    )


def _read_weights(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if (path / INDEX).is_file():
        weight_map = _read_json(path / INDEX).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ImportModelError(f"{path / INDEX} has no weight_map")
        files = sorted(set(weight_map.values()))
    elif (path / WEIGHTS).is_file():
        files = [WEIGHTS]
    else:
        raise ImportModelError(
            f"{path} has no {WEIGHTS} (edgegen reads safetensors, never pickled .bin files)"
        )
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        if "/" in name or "\\" in name or name.startswith(".."):
            raise ImportModelError(f"{path / INDEX} names a shard outside the folder: {name!r}")
        try:
            loaded = load_file(str(path / name))
        except (SafetensorError, OSError, ValueError) as e:
            raise ImportModelError(f"cannot read {path / name}: {e}") from None
        tensors.update({k: v.float().numpy() for k, v in loaded.items()})
    return tensors


def _read_json(path: Path, missing_ok: bool = False) -> dict[str, Any]:
    if missing_ok and not path.is_file():
        return {}
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise ImportModelError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ImportModelError(f"{path} must hold a JSON object")
    return data


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ImportModelError(f"cannot read {path}: {e}") from None


# --- HF config -> GPTConfig ---------------------------------------------------------

ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
}


def gpt_config(foreign: ForeignModel) -> GPTConfig:
    model_type = foreign.config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ImportModelError(
            f"{foreign.source}: architecture {model_type!r} is not supported; edgegen imports "
            f"{', '.join(ARCHITECTURES)}"
        )
    fields = ARCHITECTURES[model_type][0](_Fields(foreign))
    try:
        return config_from_dict({"family": "gpt", **fields})
    except EdgegenError as e:
        raise ImportModelError(f"{foreign.source}: {e}") from None


def gpt_tensors(foreign: ForeignModel, config: GPTConfig) -> dict[str, np.ndarray]:
    """edgegen GPT parameter name -> array, every one checked against its expected shape;
    a tensor of the source left unused is an error too (it would mean a part not mapped)."""
    mapping = ARCHITECTURES[foreign.config["model_type"]][1]
    source = _Tensors(foreign)
    tensors = mapping(source, config)
    source.check_all_used()
    return tensors


class _Fields:
    """config.json reads with one-line errors naming the field."""

    def __init__(self, foreign: ForeignModel) -> None:
        self.data, self.source = foreign.config, foreign.source

    def get(self, name: str, default: Any = None, required: bool = False) -> Any:
        if name not in self.data or self.data[name] is None:
            if required:
                raise ImportModelError(f"{self.source}: config.json lacks {name}")
            return default
        return self.data[name]

    def require(self, name: str, allowed: Callable[[Any], bool], what: str) -> None:
        if not allowed(self.data.get(name)):
            raise ImportModelError(
                f"{self.source}: config.json {name}={self.data.get(name)!r} is not supported "
                f"(edgegen supports {what})"
            )

    def activation(self, name: str) -> str:
        self.require(name, lambda v: v in ACTIVATIONS, ", ".join(ACTIVATIONS))
        return ACTIVATIONS[self.data[name]]


class _Tensors:
    """The source's tensors, taken by name with shape checks; remembers what was used."""

    IGNORED = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias")  # buffers, not weights

    def __init__(self, foreign: ForeignModel) -> None:
        self.tensors, self.source, self.used = foreign.tensors, foreign.source, set()

    def take(self, name: str, shape: tuple[int, ...], transpose: bool = False) -> np.ndarray:
        if name not in self.tensors:
            raise ImportModelError(f"{self.source}: tensor {name} is missing")
        value = self.tensors[name]
        value = value.T if transpose else value
        if tuple(value.shape) != shape:
            raise ImportModelError(
                f"{self.source}: tensor {name} has shape {tuple(value.shape)}, expected {shape}"
            )
        self.used.add(name)
        return np.ascontiguousarray(value, dtype=np.float32)

    def has(self, name: str) -> bool:
        return name in self.tensors

    def check_all_used(self) -> None:
        left = sorted(
            n for n in self.tensors if n not in self.used and not n.endswith(self.IGNORED)
        )
        if left:
            more = f" and {len(left) - 1} more" if len(left) > 1 else ""
            raise ImportModelError(f"{self.source}: tensor {left[0]}{more} is not understood")


# --- Llama ----------------------------------------------------------------------------


def _llama_fields(f: _Fields) -> dict[str, Any]:
    dim, heads = f.get("hidden_size", required=True), f.get("num_attention_heads", required=True)
    f.require("head_dim", lambda v: v in (None, dim // heads), f"head_dim = {dim // heads}")
    f.require("rope_scaling", _no_scaling, "no rope_scaling")
    f.require("mlp_bias", lambda v: not v, "mlp_bias false")
    rope = f.get("rope_parameters", {}) or {}
    f.require("rope_parameters", lambda v: _no_scaling(v), "default rope_parameters")
    return dict(
        vocab_size=f.get("vocab_size", required=True),
        dim=dim,
        n_layers=f.get("num_hidden_layers", required=True),
        n_heads=heads,
        n_kv_heads=f.get("num_key_value_heads", heads),
        max_seq_len=f.get("max_position_embeddings", required=True),
        hidden_dim=f.get("intermediate_size", required=True),
        mlp="gated",
        activation=f.activation("hidden_act"),
        norm="rmsnorm",
        norm_eps=f.get("rms_norm_eps", 1e-6),
        bias=bool(f.get("attention_bias", False)),
        pos_encoding="rope",
        rope_theta=float(f.get("rope_theta", rope.get("rope_theta", 10000.0))),
        tie_embeddings=bool(f.get("tie_word_embeddings", False)),
    )


def _no_scaling(value: Any) -> bool:
    return not value or value.get("rope_type", value.get("type", "default")) == "default"


def _llama_tensors(t: _Tensors, c: GPTConfig) -> dict[str, np.ndarray]:
    kv = c.kv_heads * c.head_dim
    out = {"tok_emb.weight": t.take("model.embed_tokens.weight", (c.vocab_size, c.dim))}
    for i in range(c.n_layers):
        hf, ours = f"model.layers.{i}.", f"blocks.{i}."
        attn = hf + "self_attn."
        parts = [("q_proj", c.dim), ("k_proj", kv), ("v_proj", kv)]
        out[ours + "attn.qkv.weight"] = np.concatenate(
            [t.take(f"{attn}{p}.weight", (rows, c.dim)) for p, rows in parts]
        )
        if c.bias:
            out[ours + "attn.qkv.bias"] = np.concatenate(
                [t.take(f"{attn}{p}.bias", (rows,)) for p, rows in parts]
            )
            out[ours + "attn.proj.bias"] = _bias_or_zeros(t, f"{attn}o_proj.bias", c.dim)
        out[ours + "attn.proj.weight"] = t.take(f"{attn}o_proj.weight", (c.dim, c.dim))
        out[ours + "norm1.weight"] = t.take(hf + "input_layernorm.weight", (c.dim,))
        out[ours + "norm2.weight"] = t.take(hf + "post_attention_layernorm.weight", (c.dim,))
        for ours_name, theirs, shape in (
            ("gate", "gate_proj", (c.mlp_dim, c.dim)),
            ("fc", "up_proj", (c.mlp_dim, c.dim)),
            ("proj", "down_proj", (c.dim, c.mlp_dim)),
        ):
            out[f"{ours}mlp.{ours_name}.weight"] = t.take(f"{hf}mlp.{theirs}.weight", shape)
            if c.bias:  # Llama puts no bias in its MLP; ours is shared with attention
                out[f"{ours}mlp.{ours_name}.bias"] = np.zeros(shape[0], dtype=np.float32)
    out["norm.weight"] = t.take("model.norm.weight", (c.dim,))
    _head(t, c, out)
    return out


def _head(t: _Tensors, c: GPTConfig, out: dict[str, np.ndarray]) -> None:
    if not c.tie_embeddings:
        out["head.weight"] = t.take("lm_head.weight", (c.vocab_size, c.dim))
    elif t.has("lm_head.weight"):  # a tied head saved anyway must be the embedding
        head = t.take("lm_head.weight", (c.vocab_size, c.dim))
        if not np.array_equal(head, out["tok_emb.weight"]):
            raise ImportModelError(
                f"{t.source}: config.json ties the head to the embedding, but lm_head.weight "
                "differs from it"
            )


def _bias_or_zeros(t: _Tensors, name: str, size: int) -> np.ndarray:
    """Qwen2-style attention biases cover q, k and v but not the output projection."""
    return t.take(name, (size,)) if t.has(name) else np.zeros(size, dtype=np.float32)


# --- GPT-2 ----------------------------------------------------------------------------


def _gpt2_fields(f: _Fields) -> dict[str, Any]:
    dim = f.get("n_embd", required=True)
    f.require("scale_attn_weights", lambda v: v in (None, True), "scale_attn_weights true")
    f.require("scale_attn_by_inverse_layer_idx", lambda v: not v, "it false")
    f.require("add_cross_attention", lambda v: not v, "no cross-attention")
    return dict(
        vocab_size=f.get("vocab_size", required=True),
        dim=dim,
        n_layers=f.get("n_layer", required=True),
        n_heads=f.get("n_head", required=True),
        max_seq_len=f.get("n_positions", required=True),
        hidden_dim=f.get("n_inner", 4 * dim),
        mlp="plain",
        activation=f.activation("activation_function"),
        norm="layernorm",
        norm_eps=f.get("layer_norm_epsilon", 1e-5),
        bias=True,
        pos_encoding="learned",
        tie_embeddings=bool(f.get("tie_word_embeddings", True)),
    )


def _gpt2_tensors(t: _Tensors, c: GPTConfig) -> dict[str, np.ndarray]:
    prefix = "transformer." if t.has("transformer.wte.weight") else ""
    out = {
        "tok_emb.weight": t.take(prefix + "wte.weight", (c.vocab_size, c.dim)),
        "pos_emb.weight": t.take(prefix + "wpe.weight", (c.max_seq_len, c.dim)),
        "norm.weight": t.take(prefix + "ln_f.weight", (c.dim,)),
        "norm.bias": t.take(prefix + "ln_f.bias", (c.dim,)),
    }
    for i in range(c.n_layers):
        hf, ours = f"{prefix}h.{i}.", f"blocks.{i}."
        # GPT-2's Conv1D keeps weights as [in, out]; a Linear's are [out, in]
        for ours_name, theirs, shape in (
            ("attn.qkv", "attn.c_attn", (3 * c.dim, c.dim)),
            ("attn.proj", "attn.c_proj", (c.dim, c.dim)),
            ("mlp.fc", "mlp.c_fc", (c.mlp_dim, c.dim)),
            ("mlp.proj", "mlp.c_proj", (c.dim, c.mlp_dim)),
        ):
            out[f"{ours}{ours_name}.weight"] = t.take(f"{hf}{theirs}.weight", shape, True)
            out[f"{ours}{ours_name}.bias"] = t.take(f"{hf}{theirs}.bias", shape[:1])
        for ours_name, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            for part in ("weight", "bias"):
                out[f"{ours}{ours_name}.{part}"] = t.take(f"{hf}{theirs}.{part}", (c.dim,))
    _head(t, c, out)
    return out


ARCHITECTURES: dict[str, tuple[Callable, Callable]] = {
    "llama": (_llama_fields, _llama_tensors),
    "gpt2": (_gpt2_fields, _gpt2_tensors),
}
