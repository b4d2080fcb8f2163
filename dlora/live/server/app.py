"""The OpenAI-compatible HTTP API (FastAPI) over a `ServingEngine`.

Endpoints: POST /v1/completions and /v1/chat/completions (SSE `data: ...` chunks and
`data: [DONE]` when `stream` is set), GET /v1/models (the base model and each adapter with
its `parent`), POST /v1/load_lora_adapter {lora_name, lora_path}, POST
/v1/unload_lora_adapter {lora_name}, GET /health, GET /metrics. The adapter is chosen by
`model` (the base model's name: no adapter). Errors use OpenAI's shape
{"error": {"message", "type", "param", "code"}}; a client that disconnects aborts its request.
With an API key every /v1 route needs it (auth.py). A request that fails alone (a fault of the
request found in its step, e.g. non-finite logits) is a 500 with the reason, or, streamed, a
`data: {"error": ...}` event before `data: [DONE]` (as vLLM streams errors).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from .auth import ApiKeyMiddleware
from .engine import Generation, GenerationParams, ServeError, ServingEngine
from .metrics import CONTENT_TYPE
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoraRequest,
    ModelCard,
    ModelList,
    UnloadLoraRequest,
    _Sampling,
    error_body,
    new_id,
)
from .text import Detokenizer

log = logging.getLogger(__name__)
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
DISCONNECT_POLL_S = 0.25
Chunk = Callable[[str, str | None], dict[str, Any]]


def _error(exc: ServeError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s is not None else None
    return JSONResponse(error_body(exc.message, exc.kind, exc.status, exc.param), exc.status, headers)


def create_app(engine: ServingEngine) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="dlora", lifespan=lifespan)
    app.state.engine = engine
    if engine.cfg.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=engine.cfg.api_key)

    @app.exception_handler(ServeError)
    async def _serve_error(_: HttpRequest, exc: ServeError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def _bad_body(_: HttpRequest, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        msg = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}"
        return JSONResponse(error_body(msg, "BadRequestError", 400, ".".join(loc) or None), 400)

    @app.get("/health")
    async def health() -> Response:
        if not any(r.is_alive for r in engine.live.cluster.replicas):
            return _error(ServeError(503, "every replica has failed", "ServiceUnavailableError"))
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> ModelList:
        cards = [ModelCard(id=engine.model_name, root=str(engine.folder),
                           max_model_len=engine.max_context_tokens)]
        cards += [ModelCard(id=a.name, root=a.path, parent=engine.model_name,
                            max_model_len=engine.max_context_tokens)
                  for a in sorted(engine.adapters.values(), key=lambda a: a.id)]
        return ModelList(data=cards)

    @app.post("/v1/load_lora_adapter")
    async def load_lora(body: LoadLoraRequest) -> PlainTextResponse:
        await asyncio.to_thread(engine.load_adapter, body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(body: UnloadLoraRequest) -> PlainTextResponse:
        left = engine.unload_adapter(body.lora_name)
        tail = f" {left} running requests finish first." if left else ""
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.{tail}")

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, raw: HttpRequest) -> Response:
        ids = _prompt_ids(engine, body.prompt)
        max_tokens = body.max_tokens or DEFAULT_COMPLETION_TOKENS
        gen = engine.submit(body.model, ids, _params(body, max_tokens))
        rid, created = new_id("cmpl"), int(time.time())

        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

        detok = Detokenizer(engine.codec, body.stop_strings())
        if body.stream:
            return _sse(gen, detok, chunk, body, None, raw)
        text = await _collect(gen, detok, raw)
        out = chunk(text, _finish_reason(gen, detok, stream=False))
        out["usage"] = _usage(gen)
        return JSONResponse(out)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatCompletionRequest, raw: HttpRequest) -> Response:
        _check(body)
        prompt = engine.codec.render_chat([{"role": m.role, "content": m.text()} for m in body.messages])
        ids = _encode(engine, prompt, "messages")
        max_tokens = next((v for v in (body.max_completion_tokens, body.max_tokens) if v is not None),
                          max(1, engine.max_context_tokens - len(ids)))
        gen = engine.submit(body.model, ids, _params(body, max_tokens))
        rid, created = new_id("chatcmpl"), int(time.time())

        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            delta = {"content": text} if text or finish is None else {}
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        detok = Detokenizer(engine.codec, body.stop_strings())
        if body.stream:
            first = chunk("", None)
            first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            return _sse(gen, detok, chunk, body, first, raw)
        text = await _collect(gen, detok, raw)
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": created, "model": body.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": _finish_reason(gen, detok, stream=False)}],
            "usage": _usage(gen)})

    return app


def _check(body: _Sampling) -> None:
    bad = body.problems()
    if bad is not None:
        raise ServeError(400, bad[1], "BadRequestError", bad[0])


def _params(body: _Sampling, max_tokens: int) -> GenerationParams:
    _check(body)
    if max_tokens < 1:
        name = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) is not None else "max_tokens"
        raise ServeError(400, f"{name} must be at least 1, got {max_tokens}", "BadRequestError", name)
    return GenerationParams(max_tokens, body.temperature, body.top_p, body.seed, body.ignore_eos,
                            tuple(body.stop_token_ids or ()))


def _encode(engine: ServingEngine, text: str, param: str) -> list[int]:
    """Token ids of `text`; 400 if it is not valid Unicode (a lone UTF-16 surrogate, which
    JSON's \\ud800 escapes allow, has no UTF-8 form)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ServeError(400, f"{param}: the text holds a lone surrogate ({text[exc.start]!r} at "
                              f"character {exc.start}), which is not valid Unicode; send UTF-8 text",
                         "BadRequestError", param) from None
    return engine.codec.encode(text)


def _prompt_ids(engine: ServingEngine, prompt: Any) -> list[int]:
    if isinstance(prompt, str):
        return _encode(engine, prompt, "prompt")
    if prompt and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) == 1:
        return _prompt_ids(engine, prompt[0])
    raise ServeError(400, "give one prompt (a string or a list of token ids); batched prompts are "
                          "not supported, send one request each", "BadRequestError", "prompt")


def _usage(gen: Generation) -> dict[str, int]:
    r = gen.request
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.generated_tokens,
            "total_tokens": r.prompt_tokens + r.generated_tokens}


def _finish_reason(gen: Generation, detok: Detokenizer, stream: bool) -> str:
    if detok.stopped:
        return "stop"
    r = gen.request
    reason = r.finish_reason or "abort"
    if reason == "stop" and r.generated_tokens >= r.output_tokens and r.output_token_ids:
        # the executor flags the last allowed token as an end; say "length" unless it is an EOS
        stops = set(r.sampling.stop_token_ids) if r.sampling else set()
        if r.sampling is not None and not r.sampling.ignore_eos:
            stops |= set(gen.engine.model_config.eos_token_ids)
        if r.output_token_ids[-1] not in stops:
            reason = "length"
    if reason == "error" and not stream:
        raise ServeError(500, gen.engine.failure(r), "InternalServerError")
    if reason.startswith("rejected"):
        if not stream:
            raise ServeError(503, f"the request could not complete: {reason}", "ServiceUnavailableError")
        return "abort"
    return reason


class ClientGone(Exception):
    pass


async def _tokens(gen: Generation, raw: HttpRequest) -> AsyncIterator[int]:
    """The request's token ids; checks for a vanished client while waiting (a stream only
    notices one when it writes, and a queued request writes nothing)."""
    while True:
        try:
            token = await gen.next(DISCONNECT_POLL_S)
        except TimeoutError:
            if await raw.is_disconnected():
                log.info("client gone: aborting request %d", gen.request.id)
                gen.close()
                raise ClientGone from None
            continue
        if token is None:
            return
        yield token


async def _collect(gen: Generation, detok: Detokenizer, raw: HttpRequest) -> str:
    """All the text of a non-streamed request; aborts it if the client disconnects."""
    parts: list[str] = []
    try:
        async for token in _tokens(gen, raw):
            parts.append(detok.add(token))
            if detok.stopped:
                return "".join(parts)
        parts.append(detok.flush())
        return "".join(parts)
    except ClientGone:
        raise ServeError(499, "client disconnected") from None
    finally:
        gen.close()


def _sse(gen: Generation, detok: Detokenizer, chunk: Chunk, body: _Sampling,
         first: dict[str, Any] | None, raw: HttpRequest) -> StreamingResponse:
    include_usage = body.stream_options is not None and body.stream_options.include_usage

    def data(obj: dict[str, Any]) -> str:
        return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"

    async def events() -> AsyncIterator[str]:
        try:
            if first is not None:
                yield data(first)
            async for token in _tokens(gen, raw):
                text = detok.add(token)
                if text:
                    yield data(chunk(text, None))
                if detok.stopped:
                    gen.close()
                    break
            if gen.request.finish_reason == "error" and not detok.stopped:
                yield data(error_body(gen.engine.failure(gen.request), "InternalServerError", 500))
                yield "data: [DONE]\n\n"
                return
            rest = detok.flush()
            if rest:
                yield data(chunk(rest, None))
            yield data(chunk("", _finish_reason(gen, detok, stream=True)))
            if include_usage:
                last = chunk("", None)
                last["choices"], last["usage"] = [], _usage(gen)
                yield data(last)
            yield "data: [DONE]\n\n"
        except ClientGone:
            return
        finally:
            gen.close()  # the client went away mid-stream: abort (frees KV blocks and slots)

    return StreamingResponse(events(), media_type="text/event-stream")

