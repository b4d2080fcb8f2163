"""Log-probabilities in OpenAI's two response shapes (vLLM's, with its -9999.0 for -inf).

Completions: {"tokens", "token_logprobs", "top_logprobs" (per position a dict token text ->
logprob: the sampled token and the `logprobs` most likely), "text_offset" (each token's start
in the returned text, after an echoed prompt)}. Chat: {"content": [{"token", "logprob",
"bytes", "top_logprobs": the `top_logprobs` most likely as {"token", "logprob", "bytes"}}]}.
Token texts are single-token decodes (special tokens kept); the values come from the executor
(`dlora.types.TokenLogprobs`: log-softmax of the raw logits)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..types import TokenLogprobs
from .text import TextCodec

FLOOR = -9999.0


class LogprobsFormat:
    """Renders the log-probabilities of consecutive output tokens; `text_offset` carries on
    across calls (one call per streamed chunk)."""

    def __init__(self, codec: TextCodec, *, chat: bool, num_top: int, text_offset: int = 0) -> None:
        self.codec, self.chat, self.num_top, self.offset = codec, chat, num_top, text_offset

    def _text(self, token_id: int) -> str:
        return self.codec.decode([token_id], skip_special_tokens=False)

    def render(self, steps: Sequence[TokenLogprobs | None]) -> dict[str, Any]:
        known = [s for s in steps if s is not None]
        return self._chat(known) if self.chat else self._completion(known)

    def _chat(self, steps: list[TokenLogprobs]) -> dict[str, Any]:
        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            text = self._text(token_id)
            return {"token": text, "logprob": max(logprob, FLOOR), "bytes": list(text.encode("utf-8"))}

        return {"content": [{**entry(s.token_id, s.logprob),
                             "top_logprobs": [entry(t, v) for t, v in s.top[:self.num_top]]}
                            for s in steps]}

    def _completion(self, steps: list[TokenLogprobs]) -> dict[str, Any]:
        tokens, values, tops, offsets = [], [], [], []
        for s in steps:
            text = self._text(s.token_id)
            tokens.append(text)
            values.append(max(s.logprob, FLOOR))
            top = {text: max(s.logprob, FLOOR)}
            top.update({self._text(t): max(v, FLOOR) for t, v in s.top[:self.num_top]})
            tops.append(top)
            offsets.append(self.offset)
            self.offset += len(text)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}
