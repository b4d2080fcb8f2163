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

A request: its fields checked (protocol.py: a 400 naming the first one the server cannot
honour), the prompt rendered (chat: the chat template, text.py) and tokenized, `n` requests
submitted with the sampling parameters (exec/sampling.py applies them), the answer built from
their token streams (streams.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from .auth import ApiKeyMiddleware
from .chat_template import ChatTemplateError
from .engine import Generation, GenerationParams, ServeError, ServingEngine
from .logprobs import LogprobsFormat
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
from .streams import collect_all, finish_reason, logprobs_of, sse, usage
from .text import Detokenizer

log = logging.getLogger(__name__)
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions


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
        _check(body)
        ids = _prompt_ids(engine, body.prompt, body.add_special_tokens)
        ids = _truncate(ids, body.truncate_prompt_tokens, engine)
        echo = _echo_text(engine, body, ids) if body.echo else ""
        gens = _submit(engine, body, ids, body.max_tokens or DEFAULT_COMPLETION_TOKENS)
        rid, created = new_id("cmpl"), int(time.time())

        def chunk(index: int, text: str, finish: str | None, logprobs: Any = None) -> dict[str, Any]:
            return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                    "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}

        detoks = [_detokenizer(engine, body) for _ in gens]
        formats = [_logprobs_format(engine, body, chat=False, text_offset=len(echo)) for _ in gens]
        if body.stream:
            return sse(gens, detoks, formats, chunk, body,
                        lambda i: [chunk(i, echo, None)] if echo else [], raw)
        texts = await collect_all(gens, detoks, raw)
        return JSONResponse({
            "id": rid, "object": "text_completion", "created": created, "model": body.model,
            "choices": [{"index": i, "text": echo + text, "logprobs": logprobs_of(g, f, count),
                         "finish_reason": finish_reason(g, d, stream=False)}
                        for i, (g, d, f, (text, count)) in enumerate(zip(gens, detoks, formats, texts, strict=True))],
            "usage": usage(gens)})

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatCompletionRequest, raw: HttpRequest) -> Response:
        _check(body)
        try:
            prompt = engine.codec.render_chat(
                [m.template_dict() for m in body.messages],
                add_generation_prompt=body.add_generation_prompt,
                continue_final_message=body.continue_final_message,
                variables=body.chat_template_kwargs, documents=body.documents)
        except ChatTemplateError as exc:
            raise ServeError(400, str(exc), "BadRequestError", "messages") from None
        ids = _encode(engine, prompt, "messages", body.add_special_tokens)
        ids = _truncate(ids, body.truncate_prompt_tokens, engine)
        max_tokens = next((v for v in (body.max_completion_tokens, body.max_tokens) if v is not None),
                          max(1, engine.max_context_tokens - len(ids)))
        last = body.messages[-1]
        echo = last.template_dict().get("content") or "" if body.echo and last.role == "assistant" else ""
        gens = _submit(engine, body, ids, max_tokens)
        rid, created = new_id("chatcmpl"), int(time.time())

        def chunk(index: int, text: str, finish: str | None, logprobs: Any = None) -> dict[str, Any]:
            delta = {"content": text} if text or finish is None else {}
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                    "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}

        def firsts(index: int) -> list[dict[str, Any]]:
            first = chunk(index, "", None)
            first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            return [first, chunk(index, echo, None)] if echo else [first]

        detoks = [_detokenizer(engine, body) for _ in gens]
        formats = [_logprobs_format(engine, body, chat=True) for _ in gens]
        if body.stream:
            return sse(gens, detoks, formats, chunk, body, firsts, raw)
        texts = await collect_all(gens, detoks, raw)
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": created, "model": body.model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": echo + text},
                         "logprobs": logprobs_of(g, f, count), "finish_reason": finish_reason(g, d, stream=False)}
                        for i, (g, d, f, (text, count)) in enumerate(zip(gens, detoks, formats, texts, strict=True))],
            "usage": usage(gens)})

    return app


def _check(body: _Sampling) -> None:
    bad = body.problems()
    if bad is not None:
        raise ServeError(400, bad[1], "BadRequestError", bad[0])


def _params(engine: ServingEngine, body: _Sampling, max_tokens: int) -> GenerationParams:
    if max_tokens < 1:
        name = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) is not None else "max_tokens"
        raise ServeError(400, f"{name} must be at least 1, got {max_tokens}", "BadRequestError", name)
    bias = body.clamped_logit_bias()
    vocab = engine.model_config.vocab_size
    outside = sorted({t for t, _ in bias if not 0 <= t < vocab})
    if outside:
        raise ServeError(400, f"token id(s) {outside} in logit_bias are outside the model's "
                              f"vocabulary [0, {vocab})", "BadRequestError", "logit_bias")
    return GenerationParams(
        max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
        ignore_eos=body.ignore_eos, stop_token_ids=tuple(body.stop_token_ids or ()),
        top_k=max(0, body.top_k or 0), min_p=body.min_p or 0.0,
        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty if body.repetition_penalty is not None else 1.0,
        logit_bias=bias, logprobs=body.num_logprobs())


def _submit(engine: ServingEngine, body: _Sampling, ids: list[int], max_tokens: int) -> list[Generation]:
    """`n` requests of the same prompt (vLLM's parallel sampling: with a seed, choice i draws
    with seed + i); all of them are closed if one cannot be submitted."""
    params = _params(engine, body, max_tokens)
    gens: list[Generation] = []
    try:
        for i in range(body.n):
            seeded = params if params.seed is None else dataclasses.replace(params, seed=params.seed + i)
            gens.append(engine.submit(body.model, ids, seeded))
    except BaseException:
        for g in gens:
            g.close()
        raise
    return gens


def _logprobs_format(engine: ServingEngine, body: _Sampling, *, chat: bool,
                     text_offset: int = 0) -> LogprobsFormat | None:
    n = body.num_logprobs()
    return None if n is None else LogprobsFormat(engine.codec, chat=chat, num_top=n, text_offset=text_offset)


def _detokenizer(engine: ServingEngine, body: _Sampling) -> Detokenizer:
    return Detokenizer(engine.codec, body.stop_strings(), include_stop=body.include_stop_str_in_output,
                       skip_special_tokens=body.skip_special_tokens)


def _encode(engine: ServingEngine, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of `text`; 400 if it is not valid Unicode (a lone UTF-16 surrogate, which
    JSON's \\ud800 escapes allow, has no UTF-8 form)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ServeError(400, f"{param}: the text holds a lone surrogate ({text[exc.start]!r} at "
                              f"character {exc.start}), which is not valid Unicode; send UTF-8 text",
                         "BadRequestError", param) from None
    return engine.codec.encode(text, add_special_tokens)


def _prompt_ids(engine: ServingEngine, prompt: Any, add_special_tokens: bool = True) -> list[int]:
    if isinstance(prompt, str):
        return _encode(engine, prompt, "prompt", add_special_tokens)
    if prompt and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) == 1:
        return _prompt_ids(engine, prompt[0], add_special_tokens)
    raise ServeError(400, "give one prompt (a string or a list of token ids); batched prompts are "
                          "not supported, send one request each", "BadRequestError", "prompt")


def _truncate(ids: list[int], keep: int | None, engine: ServingEngine) -> list[int]:
    """vLLM's truncate_prompt_tokens: the last `keep` prompt tokens (-1: the context length)."""
    if keep is None:
        return ids
    keep = engine.max_context_tokens if keep == -1 else keep
    return ids[-keep:] if keep < len(ids) else ids


def _echo_text(engine: ServingEngine, body: CompletionRequest, ids: list[int]) -> str:
    """The prompt as echoed: its text as sent, or its token ids decoded."""
    prompt = body.prompt[0] if isinstance(body.prompt, list) and len(body.prompt) == 1 else body.prompt
    if isinstance(prompt, str) and body.truncate_prompt_tokens is None:
        return prompt
    return engine.codec.decode(ids, body.skip_special_tokens)
