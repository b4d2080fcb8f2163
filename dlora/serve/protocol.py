"""OpenAI request and response bodies (the subset dlora serves), as pydantic models.

Every field OpenAI or vLLM defines for /v1/completions and /v1/chat/completions is declared
here; `problems()` gives the first one the server cannot honour, with its name, and the app
answers 400: an unknown field (vLLM logs and ignores those; dlora refuses them, so nothing is
silently dropped), a field in `refused()` set to anything but its default, or a bad value.
docs/serving.md has the table of every field and what the server does with it."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_LOGPROBS = 20  # vLLM's default --max-logprobs
MAX_LOGIT_BIAS = 100.0  # OpenAI's range; vLLM clamps to it


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False


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
    user: str | None = None  # ignored, as vLLM does
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    # vLLM's extra sampling parameters
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True  # no effect with a fast tokenizer, as in vLLM
    truncate_prompt_tokens: int | None = None
    add_special_tokens: bool = True
    request_id: str | None = None  # ignored (vLLM uses it internally)
    priority: int = 0
    length_penalty: float = 1.0  # beam search only; ignored as vLLM does without it
    # vLLM's extra parameters this server refuses unless left at their defaults
    use_beam_search: bool = False
    best_of: int | None = None
    min_tokens: int = 0
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    prompt_logprobs: int | None = None
    logits_processors: list[Any] | None = None
    return_tokens_as_token_ids: bool | None = None
    return_token_ids: bool | None = None
    cache_salt: str | None = None
    kv_transfer_params: dict[str, Any] | None = None
    vllm_xargs: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def refused(self) -> tuple[str, ...]:
        """Fields refused (400) unless left at their default."""
        return ("use_beam_search", "best_of", "min_tokens", "allowed_token_ids", "bad_words",
                "prompt_logprobs", "logits_processors", "return_tokens_as_token_ids",
                "return_token_ids", "cache_salt", "kv_transfer_params", "vllm_xargs",
                "structured_outputs", "guided_json", "guided_regex", "guided_choice",
                "guided_grammar", "guided_decoding_backend", "guided_whitespace_pattern")

    def num_logprobs(self) -> int | None:
        """Top log-probabilities per token (None: none asked for)."""
        return None

    def problems(self) -> tuple[str, str] | None:
        """(param, message) of the first bad parameter, or None."""
        for name in self.model_extra or {}:
            return name, (f"unknown field `{name}`: this server does not implement it (the fields "
                          "it takes are listed in docs/serving.md)")
        for name in self.refused():
            if getattr(self, name) != type(self).model_fields[name].default:
                return name, f"{name} is not supported by this server"
        return self._bad_value()

    def _bad_value(self) -> tuple[str, str] | None:  # noqa: C901  (one check per field)
        if self.n < 1:
            return "n", f"n must be at least 1, got {self.n}"
        if self.max_tokens is not None and self.max_tokens < 1:
            return "max_tokens", f"max_tokens must be at least 1, got {self.max_tokens}"
        if not 0.0 <= self.temperature <= 2.0:
            return "temperature", f"temperature must be in [0, 2], got {self.temperature}"
        if not 0.0 < self.top_p <= 1.0:
            return "top_p", f"top_p must be in (0, 1], got {self.top_p}"
        if self.top_k is not None and self.top_k < -1:
            return "top_k", f"top_k must be -1 or 0 (off) or at least 1, got {self.top_k}"
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            return "min_p", f"min_p must be in [0, 1], got {self.min_p}"
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                return name, f"{name} must be in [-2, 2], got {getattr(self, name)}"
        if self.repetition_penalty is not None and self.repetition_penalty <= 0.0:
            return "repetition_penalty", f"repetition_penalty must be positive, got {self.repetition_penalty}"
        if len(self.stop_strings()) > 4:
            return "stop", "at most 4 stop sequences"
        if self.logit_bias is not None and any(not _is_int(k) for k in self.logit_bias):
            return "logit_bias", "logit_bias keys must be token ids (integers, as strings)"
        if self.response_format is not None and self.response_format.get("type") != "text":
            return "response_format", (f"response_format {self.response_format.get('type')!r} is not "
                                       "supported by this server (no guided decoding); only 'text'")
        if self.priority != 0:
            return "priority", "priority scheduling is not enabled on this server"
        if self.stream_options is not None and not self.stream:
            return "stream_options", "stream_options is only allowed when stream is true"
        if self.stream_options is not None and self.stream_options.continuous_usage_stats:
            return "stream_options", "stream_options.continuous_usage_stats is not supported"
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < -1:
            return "truncate_prompt_tokens", "truncate_prompt_tokens must be -1 or at least 1"
        n_logprobs = self.num_logprobs()
        if n_logprobs is not None and not 0 <= n_logprobs <= MAX_LOGPROBS:
            return "logprobs", f"logprobs must be in [0, {MAX_LOGPROBS}], got {n_logprobs}"
        return None

    def clamped_logit_bias(self) -> tuple[tuple[int, float], ...]:
        """(token id, bias) pairs, biases clamped to [-100, 100] as vLLM does."""
        return tuple((int(k), max(-MAX_LOGIT_BIAS, min(MAX_LOGIT_BIAS, float(v))))
                     for k, v in (self.logit_bias or {}).items())


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    prompt_embeds: Any = None

    def refused(self) -> tuple[str, ...]:
        return (*super().refused(), "suffix", "prompt_embeds")

    def num_logprobs(self) -> int | None:
        return self.logprobs

    def problems(self) -> tuple[str, str] | None:
        bad = super().problems()
        if bad is None and self.echo and self.logprobs is not None:
            return "logprobs", ("echo with logprobs needs the prompt's log-probabilities, which this "
                                "server does not compute; drop one of them")
        return bad


class ChatMessage(_Open):
    """One message; fields beyond role and content (name, tool_calls, reasoning_content, ...)
    reach the chat template as they are."""

    role: str
    content: str | list[dict[str, Any]] | None = None

    def template_dict(self) -> dict[str, Any]:
        """The message as the chat template sees it: content parts of type "text" joined with
        newlines (vLLM's "string" content format); other parts are refused by `problem`."""
        out = self.model_dump()
        if isinstance(self.content, list):
            out["content"] = "\n".join(str(p.get("text", "")) for p in self.content)
        return out

    def problem(self) -> str | None:
        if isinstance(self.content, list):
            kinds = {p.get("type") for p in self.content} - {"text"}
            if kinds:
                return f"content parts of type {sorted(map(str, kinds))} are not supported (text only)"
        return None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False  # vLLM's default for chat: the template places them
    documents: list[dict[str, Any]] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # ignored without tools, as vLLM does
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    reasoning_effort: str | None = None
    include_reasoning: bool = True  # ignored: no reasoning parser here

    def refused(self) -> tuple[str, ...]:
        return (*super().refused(), "tools", "functions", "function_call", "mm_processor_kwargs",
                "reasoning_effort")

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def problems(self) -> tuple[str, str] | None:
        bad = super().problems()
        if bad is not None:
            return bad
        if self.max_completion_tokens is not None and self.max_completion_tokens < 1:
            return ("max_completion_tokens",
                    f"max_completion_tokens must be at least 1, got {self.max_completion_tokens}")
        if self.top_logprobs is not None and self.top_logprobs > 0 and not self.logprobs:
            return "top_logprobs", "when using `top_logprobs`, `logprobs` must be set to true"
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_LOGPROBS:
            return "top_logprobs", f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {self.top_logprobs}"
        if self.tool_choice not in (None, "none"):
            return "tool_choice", f"tool_choice {self.tool_choice!r} is not supported (no tool calling here)"
        if self.continue_final_message and self.add_generation_prompt:
            return ("continue_final_message", "cannot set both `continue_final_message` and "
                    "`add_generation_prompt` to true")
        if self.chat_template is not None or "chat_template" in (self.chat_template_kwargs or {}):
            return ("chat_template", "a chat template was passed with the request, but this server "
                    "does not trust request chat templates (vLLM: --trust-request-chat-template); "
                    "start it with --chat-template instead")
        for i, m in enumerate(self.messages):
            why = m.problem()
            if why is not None:
                return f"messages.{i}.content", why
        return None


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
