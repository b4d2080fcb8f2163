"""OpenAI request and response bodies (the subset dlora serves), as pydantic models.

Unknown fields are accepted and ignored, as OpenAI-compatible servers do; fields dlora cannot
honour (`n` > 1, `best_of`, `echo`, `logprobs`, `suffix`, tools) are refused with 400 by
`unsupported()` rather than silently ignored."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Open):
    include_usage: bool = False


class _Sampling(_Open):
    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extra parameter
    stop_token_ids: list[int] | None = None  # vLLM's extra parameter
    user: str | None = None

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def problems(self) -> tuple[str, str] | None:
        """(param, message) of the first bad parameter, or None."""
        if self.n != 1:
            return "n", "only n=1 is supported"
        if self.max_tokens is not None and self.max_tokens < 1:
            return "max_tokens", f"max_tokens must be at least 1, got {self.max_tokens}"
        if not 0.0 <= self.temperature <= 2.0:
            return "temperature", f"temperature must be in [0, 2], got {self.temperature}"
        if not 0.0 < self.top_p <= 1.0:
            return "top_p", f"top_p must be in (0, 1], got {self.top_p}"
        if len(self.stop_strings()) > 4:
            return "stop", "at most 4 stop sequences"
        for name in self.unsupported():
            value = getattr(self, name, None)
            if value not in ((None, 1) if name == "best_of" else (None, False, 0, [])):
                return name, f"{name} is not supported by this server"
        return None

    def unsupported(self) -> tuple[str, ...]:
        return ("best_of", "logprobs", "top_logprobs", "tools", "functions")


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None

    def unsupported(self) -> tuple[str, ...]:
        return (*super().unsupported(), "echo", "suffix")


class ChatMessage(_Open):
    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: keep the text ones
            return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None

    def problems(self) -> tuple[str, str] | None:
        if self.max_completion_tokens is not None and self.max_completion_tokens < 1:
            return ("max_completion_tokens",
                    f"max_completion_tokens must be at least 1, got {self.max_completion_tokens}")
        return super().problems()


class LoadLoraRequest(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoraRequest(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "dlora"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def error_body(message: str, kind: str, status: int, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape (vLLM also puts the status in `code`). A lone surrogate echoed from
    a request (e.g. an unknown model name) is escaped, so the body can be sent as UTF-8."""
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}
