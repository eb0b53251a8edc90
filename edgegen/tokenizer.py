"""Tokenizers (torch-free). A tokenizer is saved as `tokenizer.json` with a `type` key,
so other tokenizer types can be added without changing the file's shape."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from edgegen.errors import TokenizerError

TOKENIZER_FORMAT_VERSION = 1


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, then the special ids BOS, EOS and PAD.

    Every string round-trips exactly: encode gives its UTF-8 bytes, decode joins
    them back. Decoding an arbitrary id sequence may cut a multi-byte character;
    `decode` replaces such bytes with U+FFFD, `decode_bytes` returns them as is.
    """

    type = "byte"

    def __init__(self) -> None:
        self.bos_id = 256
        self.eos_id = 257
        self.pad_id = 258
        self.vocab_size = 259

    def encode(self, text: str | bytes, *, bos: bool = False, eos: bool = False) -> list[int]:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return [self.bos_id] * bos + list(data) + [self.eos_id] * eos

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of `ids`, special ids dropped; unknown ids raise TokenizerError."""
        out = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                out.append(i)
            elif not self.bos_id <= i < self.vocab_size:
                raise TokenizerError(
                    f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})"
                )
        return bytes(out)

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "version": TOKENIZER_FORMAT_VERSION,
            "vocab_size": self.vocab_size,
            "special_tokens": {"bos": self.bos_id, "eos": self.eos_id, "pad": self.pad_id},
        }

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteTokenizer) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(self.type)


Tokenizer = ByteTokenizer
TOKENIZER_TYPES = {"byte": ByteTokenizer}


def tokenizer_from_dict(data: Any) -> Tokenizer:
    if not isinstance(data, dict):
        raise TokenizerError("a tokenizer spec must be a JSON object")
    kind = data.get("type")
    if not isinstance(kind, str) or kind not in TOKENIZER_TYPES:
        raise TokenizerError(
            f"unknown tokenizer type {kind!r}; known: {', '.join(TOKENIZER_TYPES)}"
        )
    version = data.get("version")
    if not isinstance(version, int) or version > TOKENIZER_FORMAT_VERSION:
        raise TokenizerError(
            f"tokenizer format version {version!r} is not supported "
            f"(this edgegen reads up to {TOKENIZER_FORMAT_VERSION})"
        )
    tokenizer = TOKENIZER_TYPES[kind]()
    if data != tokenizer.to_dict():
        raise TokenizerError(f"tokenizer spec does not match the {kind} tokenizer: {data}")
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, path: Path) -> None:
    Path(path).write_text(json.dumps(tokenizer.to_dict(), indent=2) + "\n")


def load_tokenizer(path: Path) -> Tokenizer:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read tokenizer {path}: {e}") from None
    return tokenizer_from_dict(data)
