import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgegen.errors import TokenizerError
from edgegen.tokenizer import ByteTokenizer, load_tokenizer, save_tokenizer, tokenizer_from_dict

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
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    assert load_tokenizer(tmp_path / "tokenizer.json") == tok
    assert json.loads((tmp_path / "tokenizer.json").read_text())["type"] == "byte"


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
        load_tokenizer(tmp_path / "tokenizer.json")
