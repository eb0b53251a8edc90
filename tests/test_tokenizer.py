import json
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgegen.errors import TokenizerError
from edgegen.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    load_tokenizer,
    save_tokenizer,
    tokenizer_from_dict,
)
from tests.hf_tokenizers import CHAT_TOKENS, KINDS, byte_level_bpe, llama_bpe

tok = ByteTokenizer()


@given(st.text())
def test_text_round_trip(text):
    assert tok.decode(tok.encode(text)) == text


@given(st.binary())
def test_bytes_round_trip(data):
    assert tok.decode_bytes(tok.encode(data)) == data


def test_unicode_round_trip():
    text = "naïve café — 東京 🚀 \x00 \u200b"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert all(0 <= i < 256 for i in ids[1:-1])
    assert tok.decode(ids) == text


def test_special_ids_are_outside_the_bytes():
    assert {tok.bos_id, tok.eos_id, tok.pad_id} == {256, 257, 258}
    assert tok.vocab_size == 259
    assert tok.decode([tok.pad_id, 104, 105, tok.eos_id]) == "hi"


def test_cut_character_is_replaced_not_raised():
    ids = tok.encode("é")[:1]
    assert tok.decode(ids) == "\ufffd"
    assert tok.decode_bytes(ids) == b"\xc3"


@pytest.mark.parametrize("bad", [-1, 259, 10**9])
def test_out_of_range_id(bad):
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([bad])


def test_file_round_trip(tmp_path):
    save_tokenizer(tok, tmp_path)
    assert load_tokenizer(tmp_path) == tok
    assert json.loads((tmp_path / "tokenizer.json").read_text())["type"] == "byte"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json"]


@pytest.mark.parametrize(
    "spec,message",
    [
        ({"type": "bpe", "version": 1}, "unknown tokenizer type"),
        ({**tok.to_dict(), "version": 99}, "version 99 is not supported"),
        ({**tok.to_dict(), "vocab_size": 300}, "does not match"),
        ("byte", "JSON object"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(TokenizerError, match=message):
        tokenizer_from_dict(spec)


def test_unreadable_file(tmp_path):
    (tmp_path / "tokenizer.json").write_bytes(b"\xff\xfe")
    with pytest.raises(TokenizerError, match="cannot read tokenizer"):
        load_tokenizer(tmp_path)


def test_byte_tokenizer_generation_fields():
    assert tok.eos_ids == (tok.eos_id,) and tok.add_bos and tok.chat_template is None
    with pytest.raises(TokenizerError, match="does not match the tokenizer's 259"):
        tokenizer_from_dict(tok.to_dict(), vocab_size=300)


# --- Hugging Face tokenizer.json (transformers is the oracle) -----------------------

TEXTS = [
    "Hello, world! 東京は日本の首都です。",
    "emoji 🚀🎉 and a family 👩‍👩‍👧 ok",
    "def f(x):\n    return x  +  1\n\n\t\tdone",
    "   leading and trailing runs   \n\n\n",
    "<|im_start|>user\nnaïve café?<|im_end|>\n<|im_start|>assistant\n",
    "<s>Ünïcödé</s> <unk> ▁ x",
]


@pytest.fixture(scope="module", params=sorted(KINDS))
def hf_pair(request):
    """(kind, HFTokenizer, transformers' PreTrainedTokenizerFast) over one tokenizer.json."""
    from tokenizers import Tokenizer as Backend
    from transformers import PreTrainedTokenizerFast

    text = KINDS[request.param]()
    oracle = PreTrainedTokenizerFast(tokenizer_object=Backend.from_str(text))
    return request.param, HFTokenizer(text, {"type": "hf", "version": 1}), oracle


def test_hf_encode_matches_transformers(hf_pair):
    _, tokenizer, oracle = hf_pair
    for text in TEXTS:
        assert tokenizer.encode(text) == oracle.encode(text, add_special_tokens=False), text


def test_hf_decode_matches_transformers(hf_pair):
    _, tokenizer, oracle = hf_pair
    rng = random.Random(0)
    sequences = [tokenizer.encode(text) for text in TEXTS]
    sequences += [  # arbitrary ids: cut characters, stray byte tokens, specials first
        [rng.randrange(tokenizer.tokenizer_size) for _ in range(rng.randint(1, 8))]
        for _ in range(300)
    ]
    for ids in sequences:
        assert tokenizer.decode(ids) == oracle.decode(ids), ids


def test_hf_bytes_stream_token_by_token(hf_pair):
    kind, tokenizer, oracle = hf_pair
    cut = 0  # tokens that hold part of a character: what streaming must survive
    for text in TEXTS:
        ids = tokenizer.encode(text)
        pieces = [tokenizer.decode_bytes([i]) for i in ids]
        assert b"".join(pieces) == tokenizer.decode_bytes(ids)
        # the stream differs from decode only by the first token's leading space
        assert tokenizer.decode_bytes(ids).decode().lstrip(" ") == oracle.decode(ids).lstrip(" ")
        cut += sum(not _is_utf8(piece) for piece in pieces)
    assert cut > 0 or kind == "metaspace"  # it has no byte tokens: whole characters only


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_hf_special_tokens_in_the_text_become_their_ids():
    tokenizer = HFTokenizer(byte_level_bpe(), {"type": "hf", "version": 1})
    ids = tokenizer.encode("<|im_start|>user<|im_end|>")
    assert ids[0] == CHAT_TOKENS.index("<|im_start|>") and ids[-1] == CHAT_TOKENS.index(
        "<|im_end|>"
    )
    assert tokenizer.decode(ids) == "<|im_start|>user<|im_end|>"


def chat_tokenizer(**config) -> HFTokenizer:
    """The byte-level tokenizer as an importer builds it from Qwen-like HF files."""
    tokenizer_config = {
        "eos_token": {"content": "<|endoftext|>", "special": True},
        "pad_token": None,
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
        **config,
    }
    generation_config = {"eos_token_id": [0, 2]}
    return HFTokenizer.from_hf(byte_level_bpe(), tokenizer_config, generation_config, 512)


def test_from_hf_reads_the_hf_configs():
    tokenizer = chat_tokenizer()
    assert tokenizer.eos_ids == (0, 2) and tokenizer.eos_id == 0 and tokenizer.pad_id == 0
    assert tokenizer.bos_id is None and not tokenizer.add_bos
    assert tokenizer.chat_template.startswith("{% for m in messages %}")
    assert tokenizer.vocab_size == 512 and tokenizer.tokenizer_size == len(
        json.loads(byte_level_bpe())["model"]["vocab"]
    )
    assert chat_tokenizer(bos_token="<|im_start|>", add_bos_token=True).add_bos
    assert chat_tokenizer(pad_token_id=1).pad_id == 1
    assert tokenizer.encode("hi", bos=True, eos=True)[-1] == 0  # no BOS to add


def test_from_hf_follows_the_post_processor_for_bos():
    from tokenizers import Tokenizer as Backend
    from tokenizers.processors import TemplateProcessing

    backend = Backend.from_str(llama_bpe())
    backend.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = HFTokenizer.from_hf(backend.to_str(), {"bos_token": "<s>", "eos_token": "</s>"})
    assert tokenizer.add_bos and tokenizer.bos_id == 1 and tokenizer.eos_ids == (2,)
    assert tokenizer.encode("a b", bos=True)[0] == 1
    plain = HFTokenizer.from_hf(llama_bpe(), {"bos_token": "<s>"})
    assert not plain.add_bos


def test_padded_embedding_rows_decode_to_nothing():
    tokenizer = chat_tokenizer()
    padded = tokenizer.tokenizer_size  # the first row no token uses
    assert tokenizer.decode_bytes([padded, 511]) == b""
    assert tokenizer.decode([*tokenizer.encode("ok"), 511]) == "ok"
    with pytest.raises(TokenizerError, match=r"token id 512 is outside the vocabulary \(0..511\)"):
        tokenizer.decode_bytes([512])
    with pytest.raises(TokenizerError, match="beyond the model's vocab_size 300"):
        HFTokenizer(byte_level_bpe(), {"type": "hf", "version": 1}, vocab_size=300)


def test_hf_checkpoint_files_round_trip(tmp_path):
    tokenizer = chat_tokenizer()
    save_tokenizer(tokenizer, tmp_path)
    assert (tmp_path / "tokenizer.json").read_text() == byte_level_bpe()  # verbatim
    spec = json.loads((tmp_path / "tokenizer_spec.json").read_text())
    assert spec == tokenizer.to_dict() and spec["eos_ids"] == [0, 2]
    loaded = load_tokenizer(tmp_path, vocab_size=512)
    assert loaded == tokenizer and loaded.chat_template == tokenizer.chat_template
    assert loaded.encode(TEXTS[4]) == tokenizer.encode(TEXTS[4])
    save_tokenizer(tok, tmp_path)  # a byte tokenizer leaves no stale spec behind
    assert load_tokenizer(tmp_path) == tok


SPEC = {"type": "hf", "version": 1}


@pytest.mark.parametrize(
    "text,spec,message",
    [
        ("", SPEC, "tokenizer.json is empty"),
        ("{", SPEC, "not a Hugging Face tokenizer"),
        ('{"model": 3}', SPEC, "not a Hugging Face tokenizer"),
        ("BYTE", {**SPEC, "colour": 1}, "unknown fields: colour"),
        ("BYTE", {**SPEC, "special_tokens": {"bos": 400}}, r"bos id 400 is not in the vocab"),
        ("BYTE", {**SPEC, "special_tokens": {"unk": 3}}, "may name bos, eos and pad"),
        ("BYTE", {**SPEC, "eos_ids": [1, -1]}, "eos_ids id -1"),
        ("BYTE", {**SPEC, "add_bos": True}, "true needs a bos id"),
        ("BYTE", {**SPEC, "chat_template": 3}, "chat_template must be text"),
        ("WORDPIECE", SPEC, "the WordPiece decoder is not supported"),
    ],
)
def test_bad_hf_tokenizers(text, spec, message):
    text = {"BYTE": byte_level_bpe(), "WORDPIECE": _wordpiece_decoder()}.get(text, text)
    with pytest.raises(TokenizerError, match=message) as error:
        tokenizer_from_dict(spec, text)
    assert "\n" not in str(error.value)


def _wordpiece_decoder() -> str:
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders

    backend = Backend.from_str(byte_level_bpe())
    backend.decoder = decoders.WordPiece()
    return backend.to_str()


def test_bad_hf_checkpoint_files(tmp_path):
    (tmp_path / "tokenizer.json").write_text(byte_level_bpe())
    with pytest.raises(TokenizerError, match=r"tokenizer_spec\.json is missing"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_spec.json").write_text(json.dumps(SPEC))
    (tmp_path / "tokenizer.json").write_text("")
    with pytest.raises(TokenizerError, match="is empty"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match=r"needs its tokenizer\.json"):
        tokenizer_from_dict(SPEC)
    with pytest.raises(TokenizerError, match="not valid Unicode"):
        HFTokenizer(byte_level_bpe(), SPEC).encode("a\ud800")
