"""Chat-template rendering that matches ``transformers`` byte for byte, without importing it.

This mirrors transformers 5.24.0 ``PreTrainedTokenizerBase.apply_chat_template(..., tokenize=False)``:

* the Jinja environment of ``transformers.utils.chat_template_utils._cached_compile_jinja_template``: an
  ``ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`` with the ``loopcontrols`` extension
  and a ``{% generation %}`` tag (rendered as its body; transformers uses it only for assistant masks);
  the ``tojson`` filter replaced by ``json.dumps(x, ensure_ascii=False, indent=None, separators=None,
  sort_keys=False)`` (no HTML escaping, unlike Jinja's own); globals ``raise_exception``, ``strftime_now``,
  ``dict`` and a ``namespace`` that rejects underscore-prefixed attributes;
* the input preparation of ``apply_chat_template`` and ``render_jinja_template``: message objects
  (dataclasses, pydantic models) become dicts, keys whose value is ``None`` are dropped from each message,
  everything the template sees is rebuilt from plain JSON types, and a message's reasoning given as
  ``reasoning_content``, ``thinking`` or ``reasoning`` is copied under both ``reasoning_content`` and
  ``thinking``;
* the variables passed: ``messages``, ``tools``, ``documents`` (always ``None`` here),
  ``add_generation_prompt`` and every extra keyword (``enable_thinking``, ``preserve_thinking``,
  ``bos_token``, ``eos_token``, ...).
  transformers also passes the tokenizer's named special tokens (``special_tokens_map``); pass them here as
  keywords (``qwen_jax.tokenizer.QwenTokenizer.special_tokens_map``) when a template reads them.

Differences from transformers: ``add_generation_prompt`` defaults to ``True`` here (``False`` there), a
template's ``raise_exception(msg)`` raises :class:`ChatTemplateError` (a ``ValueError``) instead of
``jinja2.TemplateError``, tools must be JSON-schema dicts (no callables), and ``continue_final_message``
is not supported.

Bounds (transformers has none; a template is untrusted input): one render may create at most
:data:`MAX_RANGE_ITEMS` ``range()`` items in all (nested loops over ``range(10**5)`` would otherwise run for
hours), build no string or list longer than :data:`MAX_RENDERED_CHARS` by ``*`` or ``+`` (``'a' * 10**9``), raise
no integer to a power above :data:`MAX_POWER`, and render at most :data:`MAX_RENDERED_CHARS` characters. Each is a
``jinja2.exceptions.SecurityError``. :func:`render_chat` turns every template failure (syntax error, sandbox
refusal, undefined attribute, a bound) into one :class:`ChatTemplateError` line naming the template's file (a
template's own ``raise_exception`` message is kept as it is).
"""

from __future__ import annotations

import contextvars
import dataclasses
import importlib.resources
import json
import sys
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["ChatTemplateError", "apply_chat_template", "load_default_chat_template", "render_chat"]

#: Bounds on one render (see the module docstring).
MAX_RENDERED_CHARS = 16 * 1024 * 1024
MAX_RANGE_ITEMS = 1_000_000
MAX_POWER = 4096
#: The variables the renderer sets itself: chat_template_kwargs may not set them.
RENDERER_ARGUMENTS = ("messages", "tools", "documents", "add_generation_prompt")
_budget: contextvars.ContextVar[list[int]] = contextvars.ContextVar("chat_template_range_budget")

# Names a message's reasoning may be given under; the first is the one chat templates read.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """A chat template rejected its input, through ``raise_exception(message)`` or an empty conversation.

    ``str(error)`` (and ``error.message``) is exactly the message the template gave.
    """

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def load_default_chat_template() -> str:
    """The Qwen3.6 chat template shipped with this package (``qwen_jax/data/chat_template.jinja``)."""
    return (
        importlib.resources.files("qwen_jax").joinpath("data/chat_template.jinja").read_text(encoding="utf-8")
    )


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: renders its body unchanged.

    transformers registers this tag (its ``AssistantTracker``) to find assistant spans for
    ``return_assistant_tokens_mask``; the rendered text does not depend on it.
    """

    tags = {"generation"}  # noqa: RUF012 (jinja2's own class attribute)

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller):
        return caller()


def _raise_exception(message):
    raise ChatTemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' override of Jinja's ``tojson``: no HTML escaping, and the same json.dumps options.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


class _TemplateDict:
    # Like transformers: ``dict(...)`` and ``dict.fromkeys(...)`` without exposing the dict type itself.
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    # Like transformers: namespaces reject underscore-prefixed attributes.
    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                "Chat templates cannot store underscore-prefixed attributes on a namespace, "
                f"but got {name!r}. Please rename the attribute."
            )


def _too_long(value: Any) -> bool:
    return isinstance(value, str | list | tuple) and len(value) > MAX_RENDERED_CHARS


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox with the bounds of the module docstring on ``*``, ``+``, ``**`` and ``range``."""

    intercepted_binops = frozenset({"*", "+", "**"})

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(right) > MAX_POWER:
            raise jinja2.exceptions.SecurityError(f"power with exponent {right} exceeds {MAX_POWER}")
        if operator == "*":
            count, seq = (left, right) if isinstance(left, int) else (right, left)
            if (
                isinstance(count, int)
                and isinstance(seq, str | list | tuple)
                and count * len(seq) > MAX_RENDERED_CHARS
            ):
                raise jinja2.exceptions.SecurityError(
                    f"repetition to {count * len(seq)} items exceeds the bound of {MAX_RENDERED_CHARS}"
                )
        result = super().call_binop(context, operator, left, right)
        if _too_long(result):
            raise jinja2.exceptions.SecurityError(
                f"a value of {len(result)} items exceeds {MAX_RENDERED_CHARS}"
            )
        return result


def _bounded_range(*args):
    """``range`` with a per-render budget of :data:`MAX_RANGE_ITEMS` items across all calls."""
    items = range(*args)
    budget = _budget.get(None)
    if budget is not None:
        budget[0] -= len(items)
        if budget[0] < 0:
            raise jinja2.exceptions.SecurityError(
                f"range() calls create more than {MAX_RANGE_ITEMS} items in one render"
            )
    return items


def _jinja2_version_ok() -> bool:
    parts = []
    for piece in jinja2.__version__.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts) >= (3, 1, 6)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    if not _jinja2_version_ok():
        # transformers refuses older versions too: they have known sandbox escapes.
        raise ImportError(f"Chat templates need jinja2>=3.1.6, found {jinja2.__version__}.")
    env = _BoundedSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.globals["range"] = _bounded_range
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(template)


def _objects_to_dicts(value: Any) -> Any:
    # transformers' ``_message_objects_to_dicts``.
    if isinstance(value, Mapping):
        return {key: _objects_to_dicts(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_objects_to_dicts(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_objects_to_dicts(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _objects_to_dicts(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _objects_to_dicts(value.model_dump())
    return value


def _plain(value: Any) -> Any:
    # transformers' ``_plain_template_data``: rebuild everything from plain JSON types.
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.generic):
        return _plain(value.item())  # e.g. np.bool_(False), which would otherwise be a truthy placeholder
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning(messages: list[dict]) -> list[dict]:
    # transformers' ``_alias_reasoning_fields`` (the key order matters to templates that iterate a message).
    out = []
    for message in messages:
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _prepare_messages(messages: Any) -> list[dict]:
    if isinstance(messages, (list, tuple)) and len(messages) == 0:
        raise ChatTemplateError(
            "Cannot apply chat template to an empty conversation. Provide at least one message."
        )
    messages = _objects_to_dicts(getattr(messages, "messages", messages))
    normalized = []
    for message in messages:
        if not isinstance(message, dict):
            raise TypeError(
                f"Chat messages should be dicts, dataclasses or pydantic models, but got {message!r}."
            )
        # transformers drops None-valued keys (OpenAI-style ``content=None``, ``tool_calls=None``).
        normalized.append({key: value for key, value in message.items() if value is not None})
    return _alias_reasoning(_plain(normalized))


def apply_chat_template(
    template: str,
    messages: list[dict],
    add_generation_prompt: bool = True,
    tools: list[dict] | None = None,
    **kwargs: Any,
) -> str:
    """Render ``messages`` with the Jinja chat ``template`` exactly as transformers 5.24.0 does.

    Equals ``tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=...,
    tokenize=False, **kwargs)`` for a tokenizer carrying ``template``, provided the tokenizer's named special
    tokens that the template reads (``bos_token``, ``eos_token``, ...) are passed in ``kwargs``. Extra
    keywords such as ``enable_thinking=False`` or ``preserve_thinking=True`` become template variables.

    Raises:
        ChatTemplateError: the template called ``raise_exception(message)`` (the error carries that message),
            or ``messages`` is empty.
        TypeError: a message is not a dict (or a dataclass / pydantic model), or a tool is not a dict.
    """
    if "continue_final_message" in kwargs:
        raise NotImplementedError(
            "continue_final_message is not supported by qwen_jax.chat.apply_chat_template"
        )
    if tools is not None:
        for tool in tools:
            if not isinstance(tool, dict):
                raise TypeError(f"Tools must be JSON-schema dicts, got {type(tool).__name__}.")
    clashing = sorted(set(kwargs) & set(RENDERER_ARGUMENTS))
    if clashing:
        raise ChatTemplateError(f"template keyword(s) {clashing} collide with the renderer's own arguments")
    prepared = _prepare_messages(messages)
    compiled = _compile(template)
    token = _budget.set([MAX_RANGE_ITEMS])
    try:
        pieces, size = [], 0
        for piece in compiled.generate(
            messages=prepared,
            tools=_plain(tools),
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **_plain(kwargs),
        ):
            size += len(piece)
            if size > MAX_RENDERED_CHARS:
                raise jinja2.exceptions.SecurityError(
                    f"rendered text exceeds {MAX_RENDERED_CHARS} characters"
                )
            pieces.append(piece)
    finally:
        _budget.reset(token)
    return "".join(pieces)


def render_chat(template: str, messages: list[dict], *, source: str, **kwargs: Any) -> str:
    """:func:`apply_chat_template` for the command lines: any failure of the template (a syntax error, a sandbox
    refusal, an undefined attribute, a bound, an error inside an expression) is one :class:`ChatTemplateError` whose
    message names ``source``, the template's file; a template's own ``raise_exception(message)`` keeps its
    message unchanged."""
    try:
        return apply_chat_template(template, messages, **kwargs)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"{source}: template syntax error on line {e.lineno}: {e.message}") from None
    except ChatTemplateError:
        raise  # the template's own raise_exception message (or an empty conversation), as transformers gives it
    except (jinja2.exceptions.TemplateError, ArithmeticError, TypeError, ValueError, LookupError) as e:
        kind = (
            "refused by the sandbox" if isinstance(e, jinja2.exceptions.SecurityError) else type(e).__name__
        )
        raise ChatTemplateError(f"{source}: {kind}: {e}") from None
