"""GGUF files (llama.cpp's format) -> `ForeignModel`, in Hugging Face's names and layouts.

A GGUF holds what an HF directory holds, spelled llama.cpp's way, so reading one undoes
each of convert_hf_to_gguf's steps and the HF mapping never knows where a model came from:

    metadata  `llama.embedding_length`...      -> config.json fields
    tensors   `blk.0.attn_q.weight`, quantized -> `model.layers.0.self_attn.q_proj.weight`,
              float32, with llama's rotary row permutation and GPT-2's Conv1D transpose undone
    tokenizer tokens, merges, token types      -> a tokenizer.json built with `tokenizers`
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    normalizers,
    pre_tokenizers,
    processors,
)
from tokenizers.models import BPE

from edgegen.errors import ImportModelError, first_line
from edgegen.importers.source import ForeignModel

# Tensor types read: floats, llama.cpp's classic block quants and its K-quants.
# fmt: off
SUPPORTED_TYPES = (
    Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
    Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
)
# fmt: on
# GGUFReader reads a damaged or truncated file with no checks of its own, so it fails with
# whatever error comes up where the bytes run out or stop making sense.
_DAMAGED = (ValueError, IndexError, KeyError, OverflowError, struct.error, UnicodeDecodeError)


def read_gguf(path: str | Path) -> ForeignModel:
    """The model in a GGUF file, as the equivalent Hugging Face directory would give it."""
    path = Path(path)
    try:
        return _read(path)
    except ImportModelError as error:
        raise ImportModelError(f"{path}: {error}") from None


def _read(path: Path) -> ForeignModel:
    reader = _open(path)
    meta = _metadata(reader)
    arch = _need(meta, "general.architecture")
    family = _family(arch)
    stored = {tensor.name: tensor for tensor in reader.tensors}
    names = _check_names(arch, _need(meta, f"{arch}.block_count"), stored)
    config = family.config(meta, {name: _shape(tensor) for name, tensor in stored.items()})
    tensors = {
        names[n]: family.relayout(_stem(n), _dequantize(t), config) for n, t in stored.items()
    }
    tokenizer_json, tokenizer_config, generation_config = _read_tokenizer(meta)
    return ForeignModel(
        config, tensors, tokenizer_json, tokenizer_config, generation_config, str(path)
    )


def _open(path: Path) -> gguf.GGUFReader:
    if not path.is_file():
        raise ImportModelError("no such file")
    try:
        return gguf.GGUFReader(path)
    except _DAMAGED as error:
        raise ImportModelError(f"not a GGUF file, or a damaged one ({first_line(error)})") from None


def _metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    try:
        return {name: field.contents() for name, field in reader.fields.items()}
    except _DAMAGED as error:
        raise ImportModelError(f"damaged metadata ({first_line(error)})") from None


def _need(meta: dict[str, Any], key: str) -> Any:
    """A metadata value every file of its architecture has, as one number or string."""
    if key not in meta:
        raise ImportModelError(f"metadata {key} is missing")
    if isinstance(meta[key], list):
        raise ImportModelError(f"metadata {key} varies per layer, which edgegen cannot import")
    return meta[key]


def _get(meta: dict[str, Any], key: str, default: Any) -> Any:
    """A metadata value a file may leave out, as one number or string."""
    return _need(meta, key) if key in meta else default


def _float32(value: float) -> float:
    # GGUF stores float32; an HF config.json holds the short decimal it came from (1e-05,
    # not 9.999999747378752e-06).
    return float(str(np.float32(value)))


# --- tensors -------------------------------------------------------------------------


def _shape(tensor: gguf.ReaderTensor) -> tuple[int, ...]:
    # GGUF lists dimensions innermost first; numpy and HF list them outermost first.
    return tuple(int(n) for n in reversed(tensor.shape))


def _stem(name: str) -> str:
    """What a tensor is, without its block or suffix: blk.3.attn_q.weight -> attn_q."""
    return name.rsplit(".", 2)[-2]


def _dequantize(tensor: gguf.ReaderTensor) -> np.ndarray:
    kind = Q(tensor.tensor_type)
    if kind not in SUPPORTED_TYPES:
        supported = ", ".join(t.name for t in SUPPORTED_TYPES)
        raise ImportModelError(f"tensor {tensor.name} is {kind.name}; edgegen reads {supported}")
    values = gguf.quants.dequantize(tensor.data, kind)
    # A copy: F32 data is a view into the memory-mapped file.
    return np.array(values, dtype=np.float32).reshape(_shape(tensor))


def _check_names(arch: str, n_layers: int, stored: dict) -> dict[str, str]:
    """GGUF name -> HF name for every tensor in the file; all expected, none missing."""
    family = FAMILIES[arch]
    names = family.names(n_layers)
    unknown = [name for name in stored if name not in names]
    if unknown:
        raise ImportModelError(
            f"tensor {unknown[0]} is not part of a {arch} model as edgegen reads it"
        )
    missing = [name for name in names if name not in stored and name not in family.optional]
    if missing:
        raise ImportModelError(f"tensor {missing[0]} is missing")
    return names


def unpermute_rotary(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo the row order llama.cpp gives q_proj/k_proj (weight or bias).

    HF's rotary embedding pairs row i of a head with row i + head_dim/2; llama.cpp's pairs
    neighbouring rows, so convert_hf_to_gguf interleaves each head's two halves.
    """
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise ImportModelError(f"{rows} query/key rows do not split into {n_heads} heads")
    pairs = weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])  # (h, half, 2, ...)
    return pairs.swapaxes(1, 2).reshape(weight.shape)  # (h, 2, half, ...): halves back apart


# --- architectures -------------------------------------------------------------------


@dataclass(frozen=True)
class _Family:
    """How llama.cpp spells one HF model family."""

    top: dict[str, str]  # GGUF name outside the blocks -> HF name
    block: dict[str, str]  # GGUF name inside blk.N (without the prefix) -> HF name, "{}" for N
    optional: frozenset[str]  # GGUF names a file may lack
    config: Callable[[dict[str, Any], dict[str, tuple[int, ...]]], dict[str, Any]]  # (meta, shapes)
    relayout: Callable[[str, np.ndarray, dict[str, Any]], np.ndarray]  # (stem, values, config)

    def names(self, n_layers: int) -> dict[str, str]:
        names = dict(self.top)
        for i in range(n_layers):
            names.update(
                {f"blk.{i}.{gguf_name}": hf.format(i) for gguf_name, hf in self.block.items()}
            )
        return names


def _token_ids(meta: dict[str, Any]) -> dict[str, int]:
    # config.json repeats the tokenizer's bos/eos ids
    keys = {f"{role}_token_id": f"tokenizer.ggml.{role}_token_id" for role in ("bos", "eos")}
    return {field: meta[key] for field, key in keys.items() if key in meta}


def _rope_scaling(meta: dict[str, Any], arch: str) -> dict[str, Any]:
    kind = _get(meta, f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return {}
    if kind == "linear":
        return {
            "rope_scaling": {
                "rope_type": "linear",
                "factor": _float32(_need(meta, f"{arch}.rope.scaling.factor")),
            }
        }
    raise ImportModelError(f"rope scaling {kind!r} is not supported (supported: none, linear)")


def _llama_config(meta: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    hidden, heads = _need(meta, "llama.embedding_length"), _need(meta, "llama.attention.head_count")
    head_dim = _get(meta, "llama.attention.key_length", hidden // heads)
    if _get(meta, "llama.rope.dimension_count", head_dim) != head_dim:
        raise ImportModelError(
            "rotary embedding covers part of each head, which HF llama cannot express"
        )
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": _need(meta, "llama.feed_forward_length"),
        "num_hidden_layers": _need(meta, "llama.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _get(meta, "llama.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": _float32(_need(meta, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32(_get(meta, "llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": _need(meta, "llama.context_length"),
        "vocab_size": shapes["token_embd.weight"][0],
        "tie_word_embeddings": "output.weight" not in shapes,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        **_token_ids(meta),
        **_rope_scaling(meta, "llama"),
    }


def _llama_relayout(stem: str, values: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    return unpermute_rotary(values, heads[stem]) if stem in heads else values


def _gpt2_config(meta: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    n_embd, n_positions = _need(meta, "gpt2.embedding_length"), _need(meta, "gpt2.context_length")
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "n_embd": n_embd,
        "n_layer": _need(meta, "gpt2.block_count"),
        "n_head": _need(meta, "gpt2.attention.head_count"),
        "n_inner": _get(meta, "gpt2.feed_forward_length", 4 * n_embd),
        "n_positions": n_positions,
        "n_ctx": n_positions,
        "layer_norm_epsilon": _float32(_need(meta, "gpt2.attention.layer_norm_epsilon")),
        "activation_function": "gelu_new",
        "vocab_size": shapes["token_embd.weight"][0],
        "tie_word_embeddings": "output.weight" not in shapes,
        **_token_ids(meta),
    }


def _gpt2_relayout(stem: str, values: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    # HF GPT-2's Conv1D keeps its weight as [in, out]; convert_hf_to_gguf transposed it to
    # the [out, in] every other linear layer has.
    conv1d = {"attn_qkv", "attn_output", "ffn_up", "ffn_down"}
    return np.ascontiguousarray(values.T) if stem in conv1d and values.ndim == 2 else values


def _weights(names: dict[str, str], suffixes: tuple[str, ...]) -> dict[str, str]:
    """Each GGUF stem -> HF module, spelled out for each parameter suffix."""
    return {f"{g}.{s}": f"{hf}.{s}" for g, hf in names.items() for s in suffixes}


FAMILIES = {
    "llama": _Family(
        top=_weights(
            {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"},
            ("weight",),
        ),
        block=_weights(
            {
                "attn_norm": "model.layers.{}.input_layernorm",
                "attn_q": "model.layers.{}.self_attn.q_proj",
                "attn_k": "model.layers.{}.self_attn.k_proj",
                "attn_v": "model.layers.{}.self_attn.v_proj",
                "attn_output": "model.layers.{}.self_attn.o_proj",
                "ffn_norm": "model.layers.{}.post_attention_layernorm",
                "ffn_gate": "model.layers.{}.mlp.gate_proj",
                "ffn_up": "model.layers.{}.mlp.up_proj",
                "ffn_down": "model.layers.{}.mlp.down_proj",
            },
            ("weight",),
        ),
        optional=frozenset({"output.weight"}),
        config=_llama_config,
        relayout=_llama_relayout,
    ),
    "gpt2": _Family(
        top={
            **_weights(
                {"token_embd": "transformer.wte", "position_embd": "transformer.wpe"}, ("weight",)
            ),
            **_weights({"output_norm": "transformer.ln_f"}, ("weight", "bias")),
            "output.weight": "lm_head.weight",
        },
        block=_weights(
            {
                "attn_norm": "transformer.h.{}.ln_1",
                "attn_qkv": "transformer.h.{}.attn.c_attn",
                "attn_output": "transformer.h.{}.attn.c_proj",
                "ffn_norm": "transformer.h.{}.ln_2",
                "ffn_up": "transformer.h.{}.mlp.c_fc",
                "ffn_down": "transformer.h.{}.mlp.c_proj",
            },
            ("weight", "bias"),
        ),
        optional=frozenset({"output.weight"}),
        config=_gpt2_config,
        relayout=_gpt2_relayout,
    ),
}


def _family(arch: str) -> _Family:
    if arch not in FAMILIES:
        raise ImportModelError(
            f"architecture {arch!r} is not supported (supported: {', '.join(sorted(FAMILIES))})"
        )
    return FAMILIES[arch]


# --- tokenizer -----------------------------------------------------------------------

# llama.cpp's token types (llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4

# The published word-splitting regexes of these vocabularies; byte-level BPE merges only
# within a word, so the split must be the one the merges were learned with.
_LLAMA3_WORDS = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_WORDS = _LLAMA3_WORDS.replace(r"\p{N}{1,3}", r"\p{N}")


def _gpt2_words() -> list:
    return [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]


def _digit_words() -> list:
    # GPT-2's split, after every digit has been made a word of its own (llama.cpp's \p{N})
    return [pre_tokenizers.Digits(individual_digits=True), *_gpt2_words()]


def _regex_words(regex: str) -> Callable[[], list]:
    def words() -> list:
        split = pre_tokenizers.Split(Regex(regex), behavior="isolated")
        return [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]

    return words


# tokenizer.ggml.pre -> the pre-tokenizer steps of that vocabulary's tokenizer.json
PRE_TOKENIZERS: dict[str, Callable[[], list]] = {
    "default": _gpt2_words,
    "gpt2": _gpt2_words,
    "gpt-2": _gpt2_words,  # the name convert_hf_to_gguf writes for GPT-2 itself
    "smollm": _digit_words,
    "starcoder": _digit_words,
    "llama3": _regex_words(_LLAMA3_WORDS),
    "llama-v3": _regex_words(_LLAMA3_WORDS),
    "llama-bpe": _regex_words(_LLAMA3_WORDS),
    "qwen2": _regex_words(_QWEN2_WORDS),
    "deepseek-r1-qwen": _regex_words(_QWEN2_WORDS),
}
# Llama 3 takes a word that is a whole token as it is, whatever the merges would make of it.
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe"}


@dataclass(frozen=True)
class _Vocab:
    """The tokenizer metadata of a GGUF file."""

    tokens: list[str]
    types: list[int]
    scores: list[float]
    merges: list[str]
    special_ids: dict[str, int]  # "bos"/"eos"/"unk"/"pad" -> id

    @classmethod
    def of(cls, meta: dict[str, Any]) -> _Vocab:
        tokens = _need_list(meta, "tokenizer.ggml.tokens")
        ids = {role: meta.get(f"tokenizer.ggml.{key}") for role, key in _SPECIAL_KEYS.items()}
        vocab = cls(
            tokens=tokens,
            types=meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens),
            scores=meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens),
            merges=meta.get("tokenizer.ggml.merges") or [],
            special_ids={role: i for role, i in ids.items() if i is not None},
        )
        vocab.check()
        return vocab

    def check(self) -> None:
        if len(set(self.tokens)) != len(self.tokens):
            raise ImportModelError(
                "the vocabulary spells two tokens the same, which tokenizer.json cannot hold"
            )
        if len(self.types) != len(self.tokens) or len(self.scores) != len(self.tokens):
            raise ImportModelError("tokenizer token types or scores do not match its tokens")
        for role, i in self.special_ids.items():
            if not 0 <= i < len(self.tokens):
                raise ImportModelError(
                    f"{role} token id {i} is outside the vocabulary of {len(self.tokens)}"
                )

    def ids(self) -> dict[str, int]:
        return {token: i for i, token in enumerate(self.tokens)}

    def of_type(self, *types: int) -> list[str]:
        return [token for token, kind in zip(self.tokens, self.types, strict=True) if kind in types]


_SPECIAL_KEYS = {
    "bos": "bos_token_id",
    "eos": "eos_token_id",
    "unk": "unknown_token_id",
    "pad": "padding_token_id",
}


def _need_list(meta: dict[str, Any], key: str) -> list:
    if not isinstance(meta.get(key), list) or not meta[key]:
        raise ImportModelError(f"metadata {key} is missing")
    return meta[key]


def _byte_level_bpe(vocab: _Vocab, meta: dict[str, Any]) -> Tokenizer:
    """tokenizer.ggml.model "gpt2": byte-level BPE, tokens spelled in GPT-2's byte alphabet."""
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ImportModelError(
            f"pre-tokenizer {pre!r} is not supported (supported: {', '.join(PRE_TOKENIZERS)})"
        )
    merges = [tuple(merge.split(" ")) for merge in vocab.merges]
    if any(len(merge) != 2 for merge in merges):
        raise ImportModelError("a tokenizer merge is not two tokens separated by one space")
    tokenizer = Tokenizer(BPE(vocab.ids(), merges, ignore_merges=pre in _IGNORE_MERGES))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(PRE_TOKENIZERS[pre]())
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(vocab: _Vocab, meta: dict[str, Any]) -> Tokenizer:
    """tokenizer.ggml.model "llama": SentencePiece BPE with byte fallback, as HF's Llama has."""
    unk = vocab.tokens[vocab.special_ids["unk"]] if "unk" in vocab.special_ids else None
    model = BPE(
        vocab.ids(), _sentencepiece_merges(vocab), unk_token=unk, fuse_unk=True, byte_fallback=True
    )
    tokenizer = Tokenizer(model)
    # SentencePiece writes a space as "▁", and (add_space_prefix) starts each text with one.
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    spaces = [normalizers.Replace(" ", "\u2581")]
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), *spaces] if prefix else spaces
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence([*steps, decoders.Strip(" ", 1, 0)] if prefix else steps)
    return tokenizer


def _sentencepiece_merges(vocab: _Vocab) -> list[tuple[str, str]]:
    """The merges a SentencePiece BPE vocabulary implies: every split of a token into two
    tokens, best-scored result first, as SentencePiece picks the best-scored merge."""
    normal = {token: i for i, token in enumerate(vocab.tokens) if vocab.types[i] == NORMAL}
    ranked = []
    for token, i in normal.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in normal and right in normal:
                ranked.append((-vocab.scores[i], i, normal[left], normal[right], left, right))
    return [(left, right) for *_, left, right in sorted(ranked)]


# tokenizer.ggml.model -> how to build its tokenizer
TOKENIZER_MODELS: dict[str, Callable[[_Vocab, dict[str, Any]], Tokenizer]] = {
    "gpt2": _byte_level_bpe,
    "llama": _sentencepiece_bpe,
}


def _add_tokens(tokenizer: Tokenizer, vocab: _Vocab) -> None:
    # llama.cpp matches both kinds whole in the text before BPE; control tokens
    # (<|im_start|>) are also special: dropped when decoding with skip_special_tokens.
    special = vocab.of_type(CONTROL, UNKNOWN)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    user = vocab.of_type(USER_DEFINED)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])


def _add_ends(tokenizer: Tokenizer, vocab: _Vocab, add_bos: bool, add_eos: bool) -> None:
    """Put bos/eos around each sequence when the file says llama.cpp adds them."""
    roles = [role for role, on in (("bos", add_bos), ("eos", add_eos)) if on]
    if not roles:
        return
    if any(role not in vocab.special_ids for role in roles):
        raise ImportModelError("the tokenizer adds a bos or eos token but names none")
    token = {role: vocab.tokens[vocab.special_ids[role]] for role in roles}

    def around(sequence: str, type_id: int) -> list[str]:
        ends = [f"{token[role]}:{type_id}" for role in roles]
        return [*ends[: int(add_bos)], f"${sequence}:{type_id}", *ends[int(add_bos) :]]

    special = {token[role]: vocab.special_ids[role] for role in roles}
    tokenizer.post_processor = processors.TemplateProcessing(
        single=around("A", 0),
        pair=around("A", 0) + around("B", 1),
        special_tokens=list(special.items()),
    )


def _read_tokenizer(meta: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(tokenizer.json text, tokenizer_config, generation_config) from GGUF metadata."""
    kind = meta.get("tokenizer.ggml.model")
    if kind not in TOKENIZER_MODELS:
        raise ImportModelError(
            f"tokenizer model {kind!r} is not supported (supported: {', '.join(TOKENIZER_MODELS)})"
        )
    vocab = _Vocab.of(meta)
    tokenizer = TOKENIZER_MODELS[kind](vocab, meta)
    _add_tokens(tokenizer, vocab)
    # SentencePiece vocabularies start every text with bos unless they say otherwise.
    add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")
    add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
    _add_ends(tokenizer, vocab, add_bos, add_eos)
    config = _tokenizer_config(vocab, meta, add_bos, add_eos)
    generation = {
        f"{r}_token_id": vocab.special_ids[r] for r in ("bos", "eos") if r in vocab.special_ids
    }
    return tokenizer.to_str(), config, generation


def _tokenizer_config(
    vocab: _Vocab, meta: dict[str, Any], add_bos: bool, add_eos: bool
) -> dict[str, Any]:
    config: dict[str, Any] = {"add_bos_token": add_bos, "add_eos_token": add_eos}
    for role, i in vocab.special_ids.items():
        config[f"{role}_token"] = vocab.tokens[i]
        config[f"{role}_token_id"] = i
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config
