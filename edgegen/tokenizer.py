"""Tokenizers (torch-free): the byte tokenizer of models edgegen trains, and Hugging
Face `tokenizer.json` tokenizers (run by the `tokenizers` package) of imported ones.

Files. A byte tokenizer is its spec, saved as `tokenizer.json` with a `type` key. An
HF tokenizer keeps HF's `tokenizer.json` verbatim and its edgegen spec (special ids,
the ids that end generation, whether prompts start with BOS, the chat template) in
`tokenizer_spec.json` beside it; a bundle keeps that spec in its manifest instead.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as Backend

from edgegen.errors import TokenizerError, first_line

TOKENIZER_FORMAT_VERSION = 1
TOKENIZER_FILE = "tokenizer.json"
SPEC_FILE = "tokenizer_spec.json"  # an HF tokenizer's edgegen spec, in a checkpoint


def lone_surrogate_at(text: str) -> int | None:
    """Where `text` holds a lone surrogate (which no encoding, hence no tokenizer, takes),
    or None for valid text: the one check every text that reaches a tokenizer passes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, then the special ids BOS, EOS and PAD.

    Every string round-trips exactly: encode gives its UTF-8 bytes, decode joins
    them back. Decoding an arbitrary id sequence may cut a multi-byte character;
    `decode` replaces such bytes with U+FFFD, `decode_bytes` returns them as is.
    """

    type = "byte"
    add_bos = True  # trained documents start with BOS, so prompts do too
    chat_template = None

    def __init__(self) -> None:
        self.bos_id = 256
        self.eos_id = 257
        self.pad_id = 258
        self.vocab_size = 259
        self.tokenizer_size = 259  # ids the tokenizer itself defines
        self.eos_ids = (self.eos_id,)
        self.special_ids = frozenset((self.bos_id, self.eos_id, self.pad_id))  # no text
        self.unk_id = None  # every text encodes

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

    def file_text(self) -> str:
        """The text of its `tokenizer.json`: the spec itself."""
        return _json_text(self.to_dict())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteTokenizer) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(self.type)


class HFTokenizer:
    """A Hugging Face tokenizer.json, run by `tokenizers` (Rust, no torch).

    Ids are HF's: `encode(text)` equals transformers' `encode(text,
    add_special_tokens=False)`, so special tokens written in the text become their
    ids; BOS is added by `bos=True`, as `add_bos` says prompts want.

    Bytes come from a table built once at load, one entry per id, so the generator
    can stream token by token without cutting a character:
    `decode_bytes(ids) == b"".join(decode_bytes([i]) for i in ids)`. (So a generated
    continuation keeps its first token's space: it continues the prompt.)
    `decode(ids)` equals transformers' `decode(ids)` with its defaults
    (skip_special_tokens=False; clean_up_tokenization_spaces=False, which transformers
    5 also forces for every BPE model). It adds what a per-id table cannot know: the
    first token's space (Metaspace drops the one its pre-tokenizer prepended; a Strip
    after a Fuse, as in Llama's decoder, removes one from the whole text), and
    ByteFallback's handling of a run of byte tokens that is not valid UTF-8 (one
    U+FFFD per byte). Decoders other than ByteLevel, Metaspace, Replace (of a string),
    ByteFallback, Fuse and Strip, or none, are refused at load.

    `vocab_size` is the model's embedding rows, which may exceed the ids the
    tokenizer defines (`tokenizer_size`): padded rows decode to nothing.
    """

    type = "hf"

    def __init__(
        self, tokenizer_json: str, spec: dict[str, Any], vocab_size: int | None = None
    ) -> None:
        self._json = tokenizer_json
        self._backend = _parse_backend(tokenizer_json)
        self._chain = DecoderChain(_decoder_config(self._backend))
        tokens = _tokens_by_id(self._backend)
        self.tokenizer_size = len(tokens)
        self.vocab_size = _model_rows(vocab_size, self.tokenizer_size)
        self._tokens = tokens + [None] * (self.vocab_size - len(tokens))
        self._bytes = [b"" if t is None else self._chain.piece(t) for t in self._tokens]
        self._byte_ids = _byte_ids(tokens) if self._chain.byte_fallback else frozenset()
        # ids that stand for no text: a byte token is text even where HF marks it special
        self.special_ids = _special_ids(self._backend) - self._byte_ids
        self.unk_id = _unk_id(self._backend)  # what words outside the vocabulary become
        self._read_spec(spec)

    @classmethod
    def from_hf(
        cls,
        tokenizer_json: str,
        tokenizer_config: dict[str, Any] | None = None,
        generation_config: dict[str, Any] | None = None,
        vocab_size: int | None = None,
    ) -> HFTokenizer:
        """What an importer calls with HF's own files: tokenizer.json's text,
        tokenizer_config.json's fields (bos/eos/pad tokens or their ids, add_bos_token,
        chat_template) and generation_config.json's (eos_token_id: an id or a list)."""
        backend = _parse_backend(tokenizer_json)
        config, generation = tokenizer_config or {}, generation_config or {}
        ids = {name: _special_id(backend, config, name) for name in _SPECIAL}
        spec = {
            "type": cls.type,
            "version": TOKENIZER_FORMAT_VERSION,
            "special_tokens": ids,
            "eos_ids": _id_list(generation.get("eos_token_id"), "generation eos_token_id"),
            "add_bos": _adds_bos(backend, config, ids["bos"]),
            "chat_template": _chat_template(config.get("chat_template")),
        }
        return cls(tokenizer_json, spec, vocab_size)

    def _read_spec(self, spec: dict[str, Any]) -> None:
        unknown = sorted(set(spec) - set(_HF_SPEC_FIELDS))
        if unknown:
            raise TokenizerError(f"hf tokenizer spec has unknown fields: {', '.join(unknown)}")
        special = spec.get("special_tokens", {})
        if not isinstance(special, dict) or not set(special) <= {"bos", "eos", "pad"}:
            raise TokenizerError("hf tokenizer spec: special_tokens may name bos, eos and pad")
        self.bos_id, self._eos, self._pad = (self._id(special.get(k), k) for k in _SPECIAL)
        listed = spec.get("eos_ids", [])
        if not isinstance(listed, list):
            raise TokenizerError("hf tokenizer spec: eos_ids must be a list of token ids")
        ids = [self._eos, *(self._id(i, "eos_ids") for i in listed)]
        self.eos_ids = tuple(dict.fromkeys(i for i in ids if i is not None))
        self.add_bos, self.chat_template = _prompt_policy(spec, self.bos_id)

    def _id(self, value: Any, what: str) -> int | None:
        if value is None or (_is_id(value) and value < self.vocab_size):
            return value
        raise TokenizerError(
            f"hf tokenizer spec: {what} id {value!r} is not in the vocabulary "
            f"(0..{self.vocab_size - 1})"
        )

    @property
    def eos_id(self) -> int | None:
        return self.eos_ids[0] if self.eos_ids else None

    @property
    def pad_id(self) -> int:
        """Never None: the runtime pads finished rows with it."""
        return next(i for i in (self._pad, self.eos_id, 0) if i is not None)

    def special_tokens(self) -> dict[str, str]:
        """The special tokens' texts under HF's names (bos_token, eos_token, pad_token),
        as chat templates read them; tokens the tokenizer does not set are left out."""
        ids = {"bos_token": self.bos_id, "eos_token": self._eos, "pad_token": self._pad}
        texts = {name: self._tokens[i] for name, i in ids.items() if i is not None}
        return {name: text for name, text in texts.items() if text is not None}

    def encode(self, text: str | bytes, *, bos: bool = False, eos: bool = False) -> list[int]:
        """HF's ids for `text`; `bos`/`eos` add those tokens when the tokenizer has them."""
        text = _text(text)
        try:
            ids = self._backend.encode(text, add_special_tokens=False).ids
        except TypeError:  # what `tokenizers` says of a lone surrogate
            raise TokenizerError("the text is not valid Unicode (a lone surrogate)") from None
        except Exception as e:  # a word outside a WordLevel vocabulary without <unk>
            raise TokenizerError(f"cannot encode the text: {first_line(e)}") from None
        head = [self.bos_id] if bos and self.bos_id is not None else []
        tail = [self.eos_id] if eos and self.eos_id is not None else []
        return head + ids + tail

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes of `ids`, special tokens as their text; unknown ids raise."""
        return b"".join(self._bytes[i] for i in self._checked(ids))

    def decode(self, ids: Iterable[int]) -> str:
        ids = [i for i in self._checked(ids) if self._tokens[i] is not None]  # HF skips those
        if not ids:
            return ""
        head = self._chain.piece(self._tokens[ids[0]], first=True)
        pieces = [head, *(self._bytes[i] for i in ids[1:])]
        if self._byte_ids:
            pieces = _byte_runs_as_hf(ids, pieces, self._byte_ids)
        return self._chain.finish(b"".join(pieces)).decode("utf-8", errors="replace")

    def _checked(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise TokenizerError(
                    f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})"
                )
        return ids

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "version": TOKENIZER_FORMAT_VERSION,
            "special_tokens": {"bos": self.bos_id, "eos": self._eos, "pad": self._pad},
            "eos_ids": list(self.eos_ids),
            "add_bos": self.add_bos,
            "chat_template": self.chat_template,
        }

    def file_text(self) -> str:
        """The text of its `tokenizer.json`: HF's, verbatim."""
        return self._json

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HFTokenizer) and self._key() == other._key()

    def _key(self) -> tuple[str, int, dict[str, Any]]:
        return self._json, self.vocab_size, self.to_dict()

    def __hash__(self) -> int:
        return hash((self.type, self._json))


Tokenizer = ByteTokenizer | HFTokenizer
WORD_EOS, WORD_UNK = "<eos>", "<unk>"  # pytorch/examples word_language_model's


def word_level(words: list[str], vocab_size: int | None = None) -> HFTokenizer:
    """A word-level tokenizer (a `tokenizers` WordLevel model) where `words[i]` is id i:
    text splits on whitespace, decoding joins words with spaces, no BOS; `<eos>` ends
    generation and `<unk>` stands for unknown words, when the list has them."""
    from tokenizers import AddedToken, models, pre_tokenizers

    for i, word in enumerate(words):
        if not isinstance(word, str) or not word or word.split() != [word]:
            raise TokenizerError(f"word {i} ({word!r}) must be non-empty, without whitespace")
    vocab = {word: i for i, word in enumerate(words)}
    if len(vocab) < len(words):
        twice = next(w for i, w in enumerate(words) if vocab[w] != i)
        raise TokenizerError(f"the word {twice!r} is in the vocabulary twice")
    backend = Backend(models.WordLevel(vocab, unk_token=WORD_UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    config = {}
    if WORD_EOS in vocab:
        backend.add_special_tokens([AddedToken(WORD_EOS, special=True)])
        config["eos_token"] = WORD_EOS
    return HFTokenizer.from_hf(backend.to_str(), config, vocab_size=vocab_size)


def vocabulary_file(path: Path, vocab_size: int | None = None) -> HFTokenizer:
    """A Hugging Face tokenizer.json, or a word list (one word per line, the line number
    is the id) as a `word_level` tokenizer. A tokenizer.json's `<eos>` token, when it has
    one, ends generation."""
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if isinstance(data, dict) and "model" in data:
        backend = _parse_backend(text)
        config = {"eos_token": WORD_EOS} if backend.token_to_id(WORD_EOS) is not None else {}
        return HFTokenizer.from_hf(text, config, vocab_size=vocab_size)
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    try:
        return word_level([line.removesuffix("\r") for line in lines], vocab_size)
    except TokenizerError as e:
        raise TokenizerError(f"{path}: {e}") from None


TOKENIZER_TYPES = {"byte": ByteTokenizer, "hf": HFTokenizer}
_HF_SPEC_FIELDS = ("type", "version", "special_tokens", "eos_ids", "add_bos", "chat_template")
_SPECIAL = ("bos", "eos", "pad")


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _prompt_policy(spec: dict[str, Any], bos_id: int | None) -> tuple[bool, str | None]:
    """(add_bos, chat_template) of an hf spec."""
    add_bos, template = spec.get("add_bos", False), spec.get("chat_template")
    if not isinstance(add_bos, bool) or (add_bos and bos_id is None):
        raise TokenizerError(
            "hf tokenizer spec: add_bos must be true or false (true needs a bos id)"
        )
    if not isinstance(template, str | None):
        raise TokenizerError("hf tokenizer spec: chat_template must be text or null")
    return add_bos, template


# --- the HF decoder as bytes per token ----------------------------------------------


def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in chars.values()]
    chars.update({chr(256 + n): b for n, b in enumerate(others)})
    return chars


_BYTE_LEVEL = _byte_level_chars()
_BYTE_LEVEL_CHARS = frozenset(_BYTE_LEVEL)
_BYTE_LEVEL_LATIN1 = str.maketrans({c: chr(b) for c, b in _BYTE_LEVEL.items()})
_BYTE_TOKEN = re.compile(rb"<0x([0-9A-Fa-f]{2})>")

TokenStep = Callable[[bytes, bool], bytes]  # (a token's bytes, is it the first) -> bytes
TextStep = Callable[[bytes], bytes]  # the whole decoded text -> bytes


class DecoderChain:
    """A tokenizer.json decoder, split in two. Steps that map one token alone (ByteLevel,
    Replace, ByteFallback, Metaspace, a Strip before any Fuse) make each token's bytes,
    the per-id table; steps that need the whole text (a Strip after a Fuse or a
    ByteLevel, which fuse the tokens) run once in `finish`. Metaspace treats the first
    token of a sequence apart: it drops the space its pre-tokenizer prepended.

        Llama:  Replace(▁ -> " "), ByteFallback, Fuse | Strip(" ", 1, 0)
                per token ------------------------------ | whole text
    """

    def __init__(self, config: dict[str, Any] | None) -> None:
        self.per_token: list[TokenStep] = []
        self.whole: list[TextStep] = []
        self.fused = False
        self.byte_fallback = False  # "<0xNN>" tokens stand for bytes
        if config is None:  # no decoder: HF joins the tokens with spaces
            self.per_token.append(lambda data, first: b" " + data)
            self.whole.append(_strip({"content": " ", "start": 1, "stop": 0}))
            return
        steps = config.get("decoders") if config.get("type") == "Sequence" else [config]
        try:
            for step in steps:
                self._add(step)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise TokenizerError(f"tokenizer.json: a malformed decoder step ({e!r})") from None

    def _add(self, step: dict[str, Any]) -> None:
        kind = step.get("type")
        if (self.fused and kind != "Strip") or (kind == "ByteLevel" and self.per_token):
            raise TokenizerError(f"tokenizer.json: a {kind} decoder in that place is not supported")
        if kind in ("Fuse", "ByteLevel"):
            self.fused = True
        if kind == "ByteLevel":
            self.per_token.append(lambda data, first: _byte_level_bytes(data.decode("utf-8")))
        elif kind == "Strip":
            strip = _strip(step)
            if self.fused:
                self.whole.append(strip)
            else:
                self.per_token.append(lambda data, first: strip(data))
        elif kind in _TOKEN_STEPS:
            self.byte_fallback |= kind == "ByteFallback"
            self.per_token.append(_TOKEN_STEPS[kind](step))
        elif kind != "Fuse":
            raise TokenizerError(f"tokenizer.json: the {kind} decoder is not supported")

    def piece(self, token: str, first: bool = False) -> bytes:
        data = token.encode("utf-8")
        for step in self.per_token:
            data = step(data, first)
        return data

    def finish(self, data: bytes) -> bytes:
        for step in self.whole:
            data = step(data)
        return data


def _byte_level_bytes(token: str) -> bytes:
    """HF's ByteLevel decoder on one token: the bytes its characters stand for, or, when
    one lies outside the alphabet, the token's own UTF-8 (HF does the same to added
    tokens: "<|im_end|>" lies inside it and comes out as itself)."""
    if set(token) <= _BYTE_LEVEL_CHARS:
        return token.translate(_BYTE_LEVEL_LATIN1).encode("latin-1")
    return token.encode("utf-8")


def _replace(step: dict[str, Any]) -> TokenStep:
    pattern = step["pattern"]
    if "String" not in pattern:
        raise TokenizerError("tokenizer.json: a Replace decoder with a regex is not supported")
    old, new = pattern["String"].encode("utf-8"), step["content"].encode("utf-8")
    return lambda data, first: data.replace(old, new)


def _byte_fallback(step: dict[str, Any]) -> TokenStep:
    def piece(data: bytes, first: bool) -> bytes:
        match = _BYTE_TOKEN.fullmatch(data)
        return bytes([int(match[1], 16)]) if match else data

    return piece


def _metaspace(step: dict[str, Any]) -> TokenStep:
    mark = step.get("replacement", "\u2581").encode("utf-8")
    scheme = step.get("prepend_scheme") or (
        "always" if step.get("add_prefix_space", True) else "never"
    )

    def piece(data: bytes, first: bool) -> bytes:
        # HF drops every mark of the first token: its space was prepended by the pre-tokenizer
        return data.replace(mark, b"" if first and scheme != "never" else b" ")

    return piece


def _strip(step: dict[str, Any]) -> TextStep:
    """HF's Strip: up to `start` leading and `stop` trailing copies of `content`."""
    content, start, stop = step["content"].encode("utf-8"), int(step["start"]), int(step["stop"])

    def strip(data: bytes) -> bytes:
        for _ in range(start):
            if not data.startswith(content):
                break
            data = data[len(content) :]
        for _ in range(stop):
            if not data.endswith(content):
                break
            data = data[: len(data) - len(content)]
        return data

    return strip


_TOKEN_STEPS = {"Replace": _replace, "ByteFallback": _byte_fallback, "Metaspace": _metaspace}


def _byte_ids(tokens: list[str | None]) -> frozenset[int]:
    return frozenset(
        i for i, t in enumerate(tokens) if t is not None and _BYTE_TOKEN.fullmatch(t.encode())
    )


def _byte_runs_as_hf(ids: list[int], pieces: list[bytes], byte_ids: frozenset[int]) -> list[bytes]:
    """HF's ByteFallback decodes each run of byte tokens alone, and a run that is not
    valid UTF-8 becomes one U+FFFD per byte (Python would replace less)."""
    out: list[bytes] = []
    run: list[bytes] = []
    for i, piece in zip(ids, pieces, strict=True):
        if i in byte_ids:
            run.append(piece)
            continue
        out += _byte_run(run)
        out.append(piece)
        run = []
    return out + _byte_run(run)


def _byte_run(run: list[bytes]) -> list[bytes]:
    data = b"".join(run)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return ["\ufffd".encode() * len(run)]
    return [data]


# --- reading HF's files ---------------------------------------------------------------


def _parse_backend(text: str) -> Backend:
    if not isinstance(text, str) or not text.strip():
        raise TokenizerError("tokenizer.json is empty")
    try:
        backend = Backend.from_str(text)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # a Rust panic arrives as pyo3's PanicException, a BaseException
        raise TokenizerError(
            f"tokenizer.json is not a Hugging Face tokenizer: {first_line(e)}"
        ) from None
    backend.no_truncation()  # as transformers' encode: whole texts, no padding
    backend.no_padding()
    return backend


def _decoder_config(backend: Backend) -> dict[str, Any] | None:
    return None if backend.decoder is None else json.loads(backend.decoder.__getstate__())


def _tokens_by_id(backend: Backend) -> list[str | None]:
    """Each id's token as HF decodes it (an added token's content first); None for ids
    nothing uses."""
    size = max(backend.get_vocab(with_added_tokens=True).values(), default=-1) + 1
    return [backend.id_to_token(i) for i in range(size)]


def _special_ids(backend: Backend) -> frozenset[int]:
    return frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)


def _unk_id(backend: Backend) -> int | None:
    unk = getattr(backend.model, "unk_token", None)
    return backend.token_to_id(unk) if unk else None


def _model_rows(vocab_size: int | None, tokenizer_size: int) -> int:
    if vocab_size is None:
        return tokenizer_size
    if (
        isinstance(vocab_size, bool)
        or not isinstance(vocab_size, int)
        or vocab_size < tokenizer_size
    ):
        raise TokenizerError(
            f"tokenizer.json has ids up to {tokenizer_size - 1}, beyond the model's "
            f"vocab_size {vocab_size}"
        )
    return vocab_size


def _text(text: str | bytes) -> str:
    if isinstance(text, str):
        return text
    try:
        return bytes(text).decode("utf-8")
    except (TypeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"cannot encode {type(text).__name__}: {first_line(e)}") from None


def _special_id(backend: Backend, config: dict[str, Any], name: str) -> int | None:
    """tokenizer_config's `{name}_token_id`, or the id of its `{name}_token` (a string or
    HF's AddedToken object)."""
    if isinstance(config.get(f"{name}_token_id"), int):
        return config[f"{name}_token_id"]
    token = config.get(f"{name}_token")
    if isinstance(token, dict):
        token = token.get("content")
    if token is None:
        return None
    found = backend.token_to_id(token) if isinstance(token, str) else None
    if found is None:
        raise TokenizerError(f"the {name} token {token!r} is not in tokenizer.json")
    return found


def _id_list(value: Any, what: str) -> list[int]:
    values = [] if value is None else [value] if isinstance(value, int) else value
    if not isinstance(values, list) or not all(_is_id(i) for i in values):
        raise TokenizerError(f"{what} must be a token id or a list of them, got {value!r}")
    return values


def _adds_bos(backend: Backend, config: dict[str, Any], bos: int | None) -> bool:
    """tokenizer_config's add_bos_token when set; else what HF's post-processor does."""
    if bos is None:
        return False
    if isinstance(config.get("add_bos_token"), bool):
        return config["add_bos_token"]
    plain = backend.encode("a", add_special_tokens=False).ids
    return backend.encode("a").ids[:1] == [bos] and plain[:1] != [bos]


def _chat_template(value: Any) -> str | None:
    """tokenizer_config's chat_template: text, or HF's list of named ones."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    if value is None or isinstance(value, str):
        return value
    raise TokenizerError("tokenizer_config chat_template must be text or a list of named ones")


# --- specs and files -----------------------------------------------------------------


def spec_type(data: Any) -> str:
    """The type of a tokenizer spec, after checking its type and version."""
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
    return kind


def tokenizer_from_dict(
    data: Any, tokenizer_json: str | None = None, vocab_size: int | None = None
) -> Tokenizer:
    """The tokenizer a spec describes (an hf spec with its tokenizer.json text), fitted
    to a model of `vocab_size` rows: the byte tokenizer's size must equal it, an HF
    tokenizer's ids must stay below it (imported embeddings may be padded)."""
    if spec_type(data) == "hf":
        if tokenizer_json is None:
            raise TokenizerError("an hf tokenizer spec needs its tokenizer.json")
        return HFTokenizer(tokenizer_json, data, vocab_size)
    tokenizer = ByteTokenizer()
    if data != tokenizer.to_dict():
        raise TokenizerError(f"tokenizer spec does not match the byte tokenizer: {data}")
    if vocab_size is not None and vocab_size != tokenizer.vocab_size:
        raise TokenizerError(
            f"model vocab_size {vocab_size} does not match the tokenizer's {tokenizer.vocab_size}"
        )
    return tokenizer


def read_tokenizer(spec: Any, path: Path, vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer `spec` describes, from the file that goes with it: a byte
    tokenizer's file is the spec itself, an HF tokenizer's is HF's tokenizer.json."""
    text = _read_text(path)
    if spec_type(spec) == "hf":
        return tokenizer_from_dict(spec, text, vocab_size)
    if _json_object(text, path) != spec:
        raise TokenizerError(f"{path} does not hold the tokenizer spec it goes with")
    return tokenizer_from_dict(spec, vocab_size=vocab_size)


def save_tokenizer(tokenizer: Tokenizer, directory: Path) -> None:
    """A checkpoint's tokenizer files: TOKENIZER_FILE, and SPEC_FILE for an HF one."""
    directory = Path(directory)
    write_tokenizer_file(tokenizer, directory / TOKENIZER_FILE)
    if tokenizer.type == "hf":  # HF's file stays verbatim, so the spec goes beside it
        (directory / SPEC_FILE).write_text(_json_text(tokenizer.to_dict()))
    else:
        (directory / SPEC_FILE).unlink(missing_ok=True)


def write_tokenizer_file(tokenizer: Tokenizer, path: Path) -> None:
    """Its TOKENIZER_FILE alone, as a bundle holds it (the spec is in the manifest)."""
    Path(path).write_bytes(tokenizer.file_text().encode("utf-8"))


def load_tokenizer(directory: Path, vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer save_tokenizer wrote into `directory`, fitted to `vocab_size`."""
    directory = Path(directory)
    spec_path = directory / SPEC_FILE
    if not spec_path.exists():
        spec_path = directory / TOKENIZER_FILE
    spec = _json_object(_read_text(spec_path), spec_path)
    if "type" not in spec and "model" in spec:
        raise TokenizerError(
            f"{spec_path} is a Hugging Face tokenizer, but its {SPEC_FILE} is missing"
        )
    return read_tokenizer(spec, directory / TOKENIZER_FILE, vocab_size)


def _read_text(path: Path) -> str:
    try:
        text = Path(path).read_bytes().decode("utf-8")  # bytes: HF's file stays verbatim
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"cannot read tokenizer {path}: {first_line(e)}") from None
    if not text.strip():
        raise TokenizerError(f"tokenizer file {path} is empty")
    return text


def _json_object(text: str, path: Path) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"cannot read tokenizer {path}: {e}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"tokenizer file {path} must hold a JSON object")
    return data


def _json_text(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2) + "\n"
