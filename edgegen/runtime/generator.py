"""Text generation over a Decoder: one loop for every backend and both families.

    prompt -> ids -> prefill -> [sample -> decode_one_token]* -> text

`generate` returns a result, `stream` yields text pieces as tokens arrive (never
half a UTF-8 character, never text that may turn out to start a stop string),
`generate_batch` serves prompts of different lengths in one batch. `chat`,
`stream_chat` and `chat_batch` do the same for conversations, through the model's
chat template (runtime/chat.py).
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from edgegen.errors import ChatError, ContextError, GenerationError, SamplingError
from edgegen.runtime.chat import ChatTemplate, Message
from edgegen.runtime.decoder import Decoder, StepRunner
from edgegen.runtime.sampler import Sampler, SamplingParams
from edgegen.tokenizer import Tokenizer, lone_surrogate_at


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # generated ids (the stop string's tokens included, EOS not)
    finish_reason: str  # "length", "eos" or "stop"
    prompt_tokens: int
    prefill_s: float  # time to first token's logits
    decode_s: list[float] = field(default_factory=list)  # per decode step

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


class Generator:
    def __init__(
        self,
        runner: StepRunner,
        signature: dict[str, Any],
        tokenizer: Tokenizer,
        generation: dict[str, Any],
        backend: str,
    ) -> None:
        self.runner, self.signature, self.tokenizer = runner, signature, tokenizer
        self.defaults = {k: v for k, v in generation.items() if k in _SAMPLING_DEFAULTS}
        eos = generation.get("eos_token_id", list(tokenizer.eos_ids))
        self.defaults.setdefault("eos_token_id", eos)
        self.add_bos = generation.get("add_bos", tokenizer.add_bos)
        self.context = generation.get("max_seq_len")
        self.backend = backend

    def generate(self, prompt: str, **sampling: Any) -> GenerationResult:
        return self.generate_batch([prompt], **sampling)[0]

    def generate_batch(self, prompts: list[str], **sampling: Any) -> list[GenerationResult]:
        _check_batch(prompts, "generate_batch needs a non-empty list of prompts")
        return self._complete([self.encode_prompt(p) for p in prompts], sampling)

    def stream(self, prompt: str, **sampling: Any) -> Iterator[str]:
        yield from self._stream(Run(self, [self.encode_prompt(prompt)], sampling))

    def chat(self, messages: list[Message], **sampling: Any) -> GenerationResult:
        """The assistant's answer to `messages` ([{"role": ..., "content": ...}], as in
        Hugging Face); it ends at any eos id (the model's end of turn), which is left out."""
        return self.chat_batch([messages], **sampling)[0]

    def chat_batch(self, chats: list[list[Message]], **sampling: Any) -> list[GenerationResult]:
        _check_batch(chats, "chat_batch needs a non-empty list of conversations")
        return self._complete([self.encode_chat(c) for c in chats], sampling)

    def stream_chat(self, messages: list[Message], **sampling: Any) -> Iterator[str]:
        yield from self._stream(Run(self, [self.encode_chat(messages)], sampling))

    def render_chat(self, messages: list[Message]) -> str:
        """The prompt text of a conversation, ending with the assistant's header."""
        return self.chat_template.render(messages)

    def encode_chat(self, messages: list[Message]) -> list[int]:
        """The rendered conversation's ids, special tokens written in it as their ids. BOS
        is added when the tokenizer wants one and the template has not written it."""
        text = self.render_chat(messages)
        bos = self.chat_template.special_tokens.get("bos_token")
        return self._encode(text, bos=self.add_bos and not (bos and text.startswith(bos)))

    @cached_property
    def chat_template(self) -> ChatTemplate:
        """The model's template, compiled on first use."""
        if self.tokenizer.chat_template is None:
            raise ChatError("this model has no chat template; give it plain text to continue")
        return ChatTemplate(self.tokenizer.chat_template, self.tokenizer.special_tokens())

    def _complete(self, prompts: list[list[int]], sampling: dict) -> list[GenerationResult]:
        run = Run(self, prompts, sampling)
        for _ in run.steps():
            pass
        return run.results()

    def _stream(self, run: Run) -> Iterator[str]:
        text = TextStream(run.params.stop)
        for _ in run.steps():
            piece = text.feed(run.buffers[0], final=run.finished[0] is not None)
            if piece:
                yield piece
        tail = text.feed(run.buffers[0], final=True)
        if tail:
            yield tail

    def encode_prompt(self, prompt: str) -> list[int]:
        return self._encode(prompt, bos=self.add_bos)

    def _encode(self, prompt: str, bos: bool) -> list[int]:
        if not isinstance(prompt, str):
            raise GenerationError(f"a prompt must be text, got {type(prompt).__name__}")
        if not prompt:
            raise GenerationError("the prompt is empty")
        at = lone_surrogate_at(prompt)
        if at is not None:
            raise GenerationError(
                f"the prompt is not valid text: a lone surrogate at character {at}"
            )
        return self.tokenizer.encode(prompt, bos=bos)


def _check_batch(items: Any, message: str) -> None:
    if isinstance(items, str) or not items:
        raise GenerationError(message)


_SAMPLING_DEFAULTS = {
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
}


class Run:
    """The mutable state of one generate call: ids, bytes and finish state per row."""

    def __init__(
        self, generator: Generator, prompts: list[list[int]], sampling: dict[str, Any]
    ) -> None:
        self.g = generator
        self.prompts = prompts  # encoded
        self.params = _fitted_params(generator, max(len(p) for p in self.prompts), sampling)
        n = len(prompts)
        self.generated: list[list[int]] = [[] for _ in range(n)]
        self.seen = [list(p) for p in self.prompts]
        self.buffers = [bytearray() for _ in range(n)]
        self.finished: list[str | None] = [None] * n
        self.prefill_s, self.decode_s = 0.0, []

    def steps(self) -> Iterator[None]:
        """Yields after every sampled token (so a stream can emit it)."""
        release = getattr(self.g.runner, "release", None)  # the backend's hold on the cache
        try:
            yield from self._steps()
        finally:
            if release is not None:
                release()

    def _steps(self) -> Iterator[None]:
        p = self.params
        decoder = Decoder(self.g.runner, self.g.signature, self.g.tokenizer.pad_id)
        sampler = Sampler(p)
        if p.max_new_tokens == 0:
            self.finished = ["length"] * len(self.prompts)
            return
        start = time.perf_counter()
        logits = decoder.prefill(self.prompts)
        self.prefill_s = time.perf_counter() - start
        pad = self.g.tokenizer.pad_id
        for step in range(p.max_new_tokens):
            try:
                tokens = sampler(logits, self.seen, self.generated)
            except SamplingError as e:  # the sampler checks the logits it is given
                raise GenerationError(
                    f"the model produced non-finite logits at generation step {step} ({e})"
                ) from None
            for row, token in enumerate(tokens.tolist()):
                if self.finished[row] is None:
                    self._accept(row, token)
            yield
            if all(self.finished):
                return
            if any(self.finished):  # finished rows feed padding
                tokens = np.where([f is None for f in self.finished], tokens, pad)
            start = time.perf_counter()
            logits = decoder.decode_one_token(tokens)
            self.decode_s.append(time.perf_counter() - start)

    def _accept(self, row: int, token: int) -> None:
        p = self.params
        if token in p.eos_ids and not p.ignore_eos:
            self.finished[row] = "eos"
            return
        self.generated[row].append(token)
        self.seen[row].append(token)
        new = self.g.tokenizer.decode_bytes([token])
        buffer = self.buffers[row]
        buffer += new
        for stop in p.stop:
            needle = stop.encode("utf-8")
            at = buffer.find(needle, max(0, len(buffer) - len(new) - len(needle) + 1))
            if at >= 0:
                del buffer[at:]
                self.finished[row] = "stop"
                return
        if len(self.generated[row]) >= p.max_new_tokens:
            self.finished[row] = "length"

    def results(self) -> list[GenerationResult]:
        return [
            GenerationResult(
                text=bytes(self.buffers[row]).decode("utf-8", errors="replace"),
                token_ids=self.generated[row],
                finish_reason=self.finished[row] or "length",
                prompt_tokens=len(self.prompts[row]),
                prefill_s=self.prefill_s,
                decode_s=list(self.decode_s),
            )
            for row in range(len(self.prompts))
        ]


def _fitted_params(generator: Generator, longest: int, sampling: dict) -> SamplingParams:
    """The run's parameters, after checking the longest prompt and its new tokens fit
    the context. The bundle's default length gives way to the context; a length asked
    for does not, and 0 asked for lets a prompt fill the context exactly."""
    context, defaults = generator.context, dict(generator.defaults)
    if context is None:
        return SamplingParams.build(defaults, sampling)
    if "max_new_tokens" in defaults:
        defaults["max_new_tokens"] = min(defaults["max_new_tokens"], max(0, context - longest))
    params = SamplingParams.build(defaults, sampling)
    asked = sampling.get("max_new_tokens") is not None
    if longest > context or (longest == context and not (asked and params.max_new_tokens == 0)):
        raise ContextError(
            f"the prompt ({longest} tokens) does not fit the model's context of "
            f"{context} tokens with room to generate"
        )
    if longest + params.max_new_tokens > context:
        raise ContextError(
            f"prompt ({longest} tokens) plus max_new_tokens ({params.max_new_tokens}) "
            f"exceeds the model's context of {context} tokens"
        )
    return params


class TextStream:
    """Turns a growing byte buffer into text pieces, holding back incomplete UTF-8
    sequences and any tail that could still become a stop string."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = [s.encode("utf-8") for s in stops]
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.sent = 0  # bytes handed to the UTF-8 decoder

    def feed(self, buffer: bytearray, final: bool) -> str:
        end = len(buffer) if final else len(buffer) - self._held_back(buffer)
        piece = self.decoder.decode(bytes(buffer[self.sent : end]), final=final)
        self.sent = max(self.sent, end)
        return piece

    def _held_back(self, buffer: bytearray) -> int:
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:n]):
                    longest = n
                    break
        return longest


def default_generation_config(tokenizer: Tokenizer, context: int | None) -> dict[str, Any]:
    """What a bundle's manifest records under "generation"."""
    return {
        "add_bos": tokenizer.add_bos,  # the byte tokenizer's documents start with BOS
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": list(tokenizer.eos_ids),  # any of them ends generation
        "pad_token_id": tokenizer.pad_id,
        "max_seq_len": context,  # None: unbounded (RNN)
        "max_new_tokens": 128,
        "temperature": 0.8,
        "top_k": 40,
        "top_p": 0.95,
    }
