"""The HTTP side: a FastAPI app with ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models`` and ``/health``.

Every failure is answered with OpenAI's error JSON (:func:`qwen_jax.server.protocol.error_body`): 400 for a body
that is not valid JSON, has unknown fields or wrong types, or does not fit the context; 404 for an unknown model or
path; 405 for a wrong method; 413 for a body over ``MAX_BODY_BYTES``; 500 if decoding itself fails. None of them
stops the server.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwen_jax.chat import ChatTemplateError
from qwen_jax.replies import split_reasoning
from qwen_jax.server.batcher import Batcher
from qwen_jax.server.engine import Decoded, Engine, Row, finish
from qwen_jax.server.protocol import ApiError, ChatCompletionRequest, CompletionRequest

__all__ = ["MAX_BODY_BYTES", "RequestLog", "build_app"]

MAX_BODY_BYTES = 32 * 1024 * 1024


class RequestLog:
    """``--log FILE``: one JSON line per request (appended, flushed after each line)."""

    def __init__(self, path: Path | None):
        self._file = None if path is None else open(path, "a", encoding="utf-8")  # noqa: SIM115 (app lifetime)
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _validation_error(exc: RequestValidationError) -> ApiError:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return ApiError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
    if first.get("type") == "extra_forbidden":
        return ApiError(400, f"unknown field {'.'.join(loc)!r}", param=".".join(loc) or None)
    where = ".".join(loc) or "body"
    return ApiError(400, f"{where}: {first['msg']}", param=loc[0] if loc else None)  # the top-level field


def build_app(
    engine: Engine,
    *,
    served_model_name: str,
    max_batch_size: int,
    batch_wait_s: float = 0.01,
    reasoning_parser: str = "qwen3",
    log_path: Path | None = None,
) -> FastAPI:
    """The app serving ``engine``. Rows are batched by a :class:`Batcher` of at most ``max_batch_size`` rows."""
    batcher = Batcher(engine.decode_batch, max_batch_size, batch_wait_s)
    log = RequestLog(log_path)
    stop_ids = frozenset(engine.stop_token_ids)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        yield
        await batcher.stop()
        log.close()

    app = FastAPI(title="qwen_jax", lifespan=lifespan)
    app.state.batcher = batcher

    # ------------------------------------------------------------------------------------------------
    # Errors: always OpenAI's body.

    async def _error(request: Request, error: ApiError) -> JSONResponse:
        body = await request.body() if request.method == "POST" else b""
        log.write(
            {
                "time": time.time(),
                "endpoint": request.url.path,
                "request_body": body.decode("utf-8", "replace")[:10000],
                "status": error.status,
                "error": error.body()["error"],
            }
        )
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return await _error(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return await _error(request, _validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return await _error(request, ApiError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        return await _error(request, ApiError(500, f"{type(exc).__name__}: {exc}"))

    @app.middleware("http")
    async def _body_limit(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            error = ApiError(413, f"the body is over {MAX_BODY_BYTES} bytes", code="request_too_large")
            return JSONResponse(error.body(), status_code=413)
        return await call_next(request)

    # ------------------------------------------------------------------------------------------------
    # Shared steps of the two completion endpoints.

    def check_model(model: str | None) -> None:
        if model is not None and model != served_model_name:
            raise ApiError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")

    def row(prompt_ids: list[int], max_tokens: int | None) -> Row:
        if not prompt_ids:
            raise ApiError(400, "the prompt is empty after tokenization", param="prompt")
        vocab = engine.model.cfg.vocab_size
        if not all(0 <= t < vocab for t in prompt_ids):
            raise ApiError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
        try:
            budget = engine.budget(len(prompt_ids), max_tokens)
        except ValueError as exc:
            raise ApiError(400, str(exc), param="messages", code="context_length_exceeded") from None
        return Row(tuple(prompt_ids), budget)

    def usage(rows: list[Row], finished) -> dict[str, int]:
        prompt = sum(len(r.prompt_ids) for r in rows)
        completion = sum(f.completion_tokens for f in finished)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def log_record(kind: str, body, prompts, rows, decoded: list[Decoded], reply) -> None:
        log.write(
            {
                "time": time.time(),
                "endpoint": kind,
                "request": body.model_dump(exclude_unset=True),
                "prompts": [
                    {
                        "prompt": text,
                        "prompt_ids": list(r.prompt_ids),
                        "generated_ids": list(d.generated_ids),
                        "batch": {
                            "id": d.batch_id,
                            "row": d.row,
                            "size": d.batch_size,
                            "generate_kwargs": d.generate_kwargs,
                        },
                    }
                    for text, r, d in zip(prompts, rows, decoded, strict=True)
                ],
                "reply": reply,
            }
        )

    def sse(chunks: list[dict]) -> StreamingResponse:
        async def events():
            for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    # ------------------------------------------------------------------------------------------------
    # Routes.

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": served_model_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "qwen_jax",
                    "max_model_len": engine.max_model_len,
                }
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        check_model(body.model)
        body.check_greedy()
        max_tokens = body.token_budget()
        try:
            text = engine.render_chat(body.messages, body.chat_template_kwargs)
        except (ChatTemplateError, TypeError, jinja2.TemplateError) as exc:
            raise ApiError(400, f"the chat template refused the messages: {exc}", param="messages") from None
        rows = [row(engine.encode(text), max_tokens)]
        decoded = await batcher.submit(rows)
        done = finish(engine.tokenizer, decoded[0].generated_ids, stop_ids, body.stop_strings())
        if reasoning_parser == "qwen3":
            thinking = body.chat_template_kwargs.get("enable_thinking", True)
            reasoning, content = split_reasoning(done.text, enable_thinking=bool(thinking))
        else:
            reasoning, content = None, done.text
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        message = {"role": "assistant", "content": content, "reasoning_content": reasoning}
        reply = {
            "id": reply_id,
            "object": "chat.completion",
            "created": created,
            "model": served_model_name,
            "choices": [
                {"index": 0, "message": message, "finish_reason": done.finish_reason, "logprobs": None}
            ],
            "usage": usage(rows, [done]),
        }
        log_record("/v1/chat/completions", body, [text], rows, decoded, reply)
        if not body.stream:
            return reply
        base = {
            "id": reply_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": served_model_name,
        }
        deltas = [{"role": "assistant", "content": ""}]
        deltas += [{"reasoning_content": reasoning}] if reasoning else []
        deltas += [{"content": content}] if content else []
        chunks = [
            {**base, "choices": [{"index": 0, "delta": d, "finish_reason": None, "logprobs": None}]}
            for d in deltas
        ]
        chunks.append(
            {
                **base,
                "choices": [{"index": 0, "delta": {}, "finish_reason": done.finish_reason, "logprobs": None}],
            }
        )
        if body.stream_options is not None and body.stream_options.include_usage:
            chunks.append({**base, "choices": [], "usage": reply["usage"]})
        return sse(chunks)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        check_model(body.model)
        body.check_greedy()
        max_tokens = body.token_budget()
        prompts = body.prompts()
        rows = [row(engine.encode(p) if isinstance(p, str) else list(p), max_tokens) for p in prompts]
        texts = [p if isinstance(p, str) else engine.decode(p) for p in prompts]
        decoded = await batcher.submit(rows)
        done = [finish(engine.tokenizer, d.generated_ids, stop_ids, body.stop_strings()) for d in decoded]
        reply_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        choices = [
            {"index": k, "text": f.text, "finish_reason": f.finish_reason, "logprobs": None}
            for k, f in enumerate(done)
        ]
        reply = {
            "id": reply_id,
            "object": "text_completion",
            "created": created,
            "model": served_model_name,
            "choices": choices,
            "usage": usage(rows, done),
        }
        log_record("/v1/completions", body, texts, rows, decoded, reply)
        if not body.stream:
            return reply
        base = {"id": reply_id, "object": "text_completion", "created": created, "model": served_model_name}
        chunks = [{**base, "choices": [c]} for c in choices]
        if body.stream_options is not None and body.stream_options.include_usage:
            chunks.append({**base, "choices": [], "usage": reply["usage"]})
        return sse(chunks)

    return app
