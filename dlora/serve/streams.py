"""The bodies of answers over a request's `Generation`s: collected texts (non-streamed),
server-sent events (streamed; several choices interleaved as their tokens come), usage,
finish reasons and log-probabilities. A client that vanishes aborts its requests."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request as HttpRequest
from fastapi.responses import StreamingResponse

from .engine import Generation, ServeError
from .logprobs import LogprobsFormat
from .protocol import _Sampling, error_body
from .text import Detokenizer

log = logging.getLogger(__name__)
DISCONNECT_POLL_S = 0.25
Chunk = Callable[..., dict[str, Any]]  # (index, text, finish reason, logprobs=None)


def logprobs_of(gen: Generation, fmt: LogprobsFormat | None, count: int, start: int = 0) -> Any:
    """The log-probabilities of output tokens [start, count) of `gen` (None: not asked for)."""
    if fmt is None:
        return None
    return fmt.render(gen.request.output_logprobs[start:count])


def usage(gens: list[Generation]) -> dict[str, int]:
    prompt = gens[0].request.prompt_tokens
    completion = sum(g.request.generated_tokens for g in gens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_reason(gen: Generation, detok: Detokenizer, stream: bool) -> str:
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


async def tokens(gen: Generation, raw: HttpRequest) -> AsyncIterator[int]:
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


async def collect(gen: Generation, detok: Detokenizer, raw: HttpRequest) -> tuple[str, int]:
    """All the text of a non-streamed request and how many tokens it took (up to the stop
    string); aborts it if the client disconnects."""
    parts: list[str] = []
    count = 0
    try:
        async for token in tokens(gen, raw):
            count += 1
            parts.append(detok.add(token))
            if detok.stopped:
                return "".join(parts), count
        parts.append(detok.flush())
        return "".join(parts), count
    except ClientGone:
        raise ServeError(499, "client disconnected") from None
    finally:
        gen.close()


async def collect_all(gens: list[Generation], detoks: list[Detokenizer],
                       raw: HttpRequest) -> list[tuple[str, int]]:
    """The texts of every choice; if one fails, every other is aborted."""
    try:
        return list(await asyncio.gather(*(collect(g, d, raw) for g, d in zip(gens, detoks, strict=True))))
    finally:
        for g in gens:
            g.close()


async def merge(streams: list[AsyncIterator[str]]) -> AsyncIterator[str]:
    """The items of several async iterators as they come (one: as it is)."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield item
        return
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    async def pump(stream: AsyncIterator[str]) -> None:
        try:
            async for item in stream:
                await queue.put(item)
        except ClientGone:
            pass
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        left = len(tasks)
        while left:
            got = await queue.get()
            if got is None:
                left -= 1
            else:
                yield got
    finally:
        for t in tasks:
            t.cancel()


def sse(gens: list[Generation], detoks: list[Detokenizer], formats: list[LogprobsFormat | None],
         chunk: Chunk, body: _Sampling, firsts: Callable[[int], list[dict[str, Any]]],
         raw: HttpRequest) -> StreamingResponse:
    """Server-sent events of every choice (interleaved as their tokens come), then the usage
    chunk if asked for and `data: [DONE]`; a choice that fails alone sends an error event."""
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    failed: list[int] = []

    def data(obj: dict[str, Any]) -> str:
        return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"

    async def choice(index: int, gen: Generation, detok: Detokenizer,
                     fmt: LogprobsFormat | None) -> AsyncIterator[str]:
        for obj in firsts(index):
            yield data(obj)
        count = sent = 0  # tokens received; tokens whose logprobs went out
        async for token in tokens(gen, raw):
            count += 1
            text = detok.add(token)
            if text:
                yield data(chunk(index, text, None, logprobs_of(gen, fmt, count, sent)))
                sent = count
            if detok.stopped:
                gen.close()
                break
        if gen.request.finish_reason == "error" and not detok.stopped:
            failed.append(index)
            yield data(error_body(gen.engine.failure(gen.request), "InternalServerError", 500))
            return
        rest = detok.flush()
        if rest or (fmt is not None and count > sent):
            yield data(chunk(index, rest, None, logprobs_of(gen, fmt, count, sent)))
        yield data(chunk(index, "", finish_reason(gen, detok, stream=True)))

    async def events() -> AsyncIterator[str]:
        try:
            streams = [choice(i, g, d, f) for i, (g, d, f) in enumerate(zip(gens, detoks, formats, strict=True))]
            async for item in merge(streams):
                yield item
            if include_usage and not failed:
                last = chunk(0, "", None)
                last["choices"], last["usage"] = [], usage(gens)
                yield data(last)
            yield "data: [DONE]\n\n"
        except ClientGone:
            return
        finally:
            for g in gens:
                g.close()  # the client went away mid-stream: abort (frees KV blocks and slots)

    return StreamingResponse(events(), media_type="text/event-stream")
