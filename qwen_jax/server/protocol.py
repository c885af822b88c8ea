"""The OpenAI API surface the server accepts: request bodies (strict: unknown fields and wrong types are refused)
and the error body every failure is answered with.

Only greedy decoding exists, so the sampling fields are accepted with their greedy values only (``temperature``
0 or absent, ``top_p`` 1, penalties 0, ``n`` 1); any other value is a 400 naming the field, never silently ignored.
``seed`` is accepted and recorded: greedy decoding does not use it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["ApiError", "ChatCompletionRequest", "CompletionRequest", "error_body"]

_ROLES = ("system", "developer", "user", "assistant", "tool")


class ApiError(Exception):
    """A request the server refuses, answered as OpenAI does: ``status`` and :func:`error_body`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    @property
    def type(self) -> str:
        if self.status == 404:
            return "NotFoundError"
        return "invalid_request_error" if self.status < 500 else "internal_server_error"

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | int | None = None) -> dict:
    """OpenAI's error JSON: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _Common(BaseModel):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: bool | int | None = None
    user: str | None = None

    def check_greedy(self) -> None:
        """A 400 for every sampling option set to something other than greedy decoding."""
        if self.temperature not in (None, 0):
            raise ApiError(400, "only greedy decoding is served: temperature must be 0", param="temperature")
        if self.top_p not in (None, 1):
            raise ApiError(400, "only greedy decoding is served: top_p must be 1", param="top_p")
        if self.n != 1:
            raise ApiError(400, "only n=1 is served", param="n")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) != 0:
                raise ApiError(400, f"{name} is not supported (must be 0)", param=name)
        if self.logprobs not in (None, False, 0):
            raise ApiError(400, "logprobs are not served", param="logprobs")

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(_Common):
    """``POST /v1/chat/completions``. Messages are passed to the chat template as given (extra keys such as
    lm-eval's ``"type": "text"`` included), as transformers and vLLM pass them."""

    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("messages")
    @classmethod
    def _roles(cls, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, message in enumerate(messages):
            if message.get("role") not in _ROLES:
                raise ValueError(f"messages[{i}].role must be one of {', '.join(_ROLES)}")
            content = message.get("content")
            if content is not None and not isinstance(content, str | list):
                raise ValueError(f"messages[{i}].content must be a string, a list of parts or null")
        return messages

    def token_budget(self) -> int | None:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ApiError(400, "give max_tokens or max_completion_tokens, not both", param="max_tokens")
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens


class CompletionRequest(_Common):
    """``POST /v1/completions``: ``prompt`` is a string, token ids, or a list of either (one choice each)."""

    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False

    def prompts(self) -> list[str | list[int]]:
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise ApiError(400, "prompt is empty", param="prompt")
        if isinstance(prompt[0], int):
            return [prompt]
        return list(prompt)

    def token_budget(self) -> int | None:
        if self.echo:
            raise ApiError(400, "echo is not served", param="echo")
        return self.max_tokens
