"""Chat templates (torch-free): a model's Jinja template rendered as transformers'
`apply_chat_template(messages, tokenize=False, add_generation_prompt=True)` renders it.

A template arrives with a downloaded model, so it is untrusted code: it runs in
jinja2's immutable sandbox and sees what Hugging Face gives it and nothing more:
trim_blocks and lstrip_blocks, the loop controls ({% break %}), `raise_exception`,
`strftime_now`, a `tojson` that leaves HTML alone, and the special tokens' texts
(`bos_token`, `eos_token`, `pad_token`). A template's default system message is its
own business: it writes one when the messages start without one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from edgegen.errors import ChatError, first_line
from edgegen.tokenizer import lone_surrogate_at

Message = dict[str, Any]  # {"role": "user", "content": "..."} (other keys pass through)


class ChatTemplate:
    """A template compiled once, rendered per conversation."""

    def __init__(self, source: str, special_tokens: Mapping[str, str]) -> None:
        self.template = _compile(source)
        self.special_tokens = dict(special_tokens)  # bos_token, eos_token, pad_token

    def render(self, messages: Any, add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages`, ending with the assistant's header."""
        variables = {
            **self.special_tokens,
            "messages": checked_messages(messages),
            "tools": None,
            "documents": None,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return self.template.render(**variables)
        except Exception as e:  # the template is foreign code: any failure is its message
            raise ChatError(f"the chat template cannot render these messages: {_line(e)}") from None


def checked_messages(messages: Any) -> list[Message]:
    """Copies of the messages, after checking each is a dict with text role and content.
    Keys set to None are dropped, as transformers drops them (OpenAI's `tool_calls=None`)."""
    if not isinstance(messages, list | tuple) or not messages:
        raise ChatError(
            'messages must be a non-empty list of {"role": ..., "content": ...} dicts, '
            f"got {_kind(messages)}"
        )
    return [_checked(i, m) for i, m in enumerate(messages)]


def _checked(index: int, message: Any) -> Message:
    if not isinstance(message, Mapping):
        raise ChatError(f"message {index} must be a dict (role, content), got {_kind(message)}")
    for key in ("role", "content"):
        if key not in message:
            raise ChatError(f"message {index} has no {key!r}")
        if not isinstance(message[key], str):
            raise ChatError(f"message {index}: {key} must be text, got {_kind(message[key])}")
    at = lone_surrogate_at(message["content"])
    if at is not None:
        raise ChatError(
            f"message {index}: content is not valid text (a lone surrogate at character {at})"
        )
    return {k: v for k, v in message.items() if v is not None}


def _kind(value: Any) -> str:
    empty = isinstance(value, list | tuple) and not value
    return "an empty list" if empty else type(value).__name__


def _line(e: Exception) -> str:
    """An error's first line; a template's own raise_exception message stands alone."""
    text = first_line(e)
    return text if isinstance(e, _TemplateRefusal) else f"{type(e).__name__}: {text}"


def _compile(source: str):
    """The template in the sandbox, with Hugging Face's options and helpers. jinja2 is
    imported here so that plain generation never pays for it."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatError(f"the chat template does not parse: line {e.lineno}: {e.message}") from None


class _TemplateRefusal(Exception):
    """What a template's raise_exception(...) raises."""


def _raise_exception(message: str) -> None:
    raise _TemplateRefusal(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # jinja's own tojson escapes <, > and & for HTML; prompts want them as they are
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)
