"""Chat templates as Hugging Face transformers 5 applies them, without importing transformers.

Where a template comes from (`find_chat_template`, transformers 5's loading order):
`chat_template.jinja` in the model folder (the default template), `chat_templates/NAME.jinja`
(named ones), else `tokenizer_config.json`'s `chat_template` (a string, or a list of
{"name", "template"}); several templates need one named "default". `--chat-template` replaces
them all (`load_chat_template`: a file path, or the template itself when it is no readable file
and holds one of "{", "}" or a newline, as vLLM decides).

How it renders (`render_chat`, `apply_chat_template(..., tokenize=False)`): a jinja2
ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks, loop controls, the
`{% generation %}` tag (rendered as its body), HF's `tojson` (json.dumps, no HTML escaping),
`raise_exception` (a TemplateError: the server answers 400 with its message), `strftime_now`,
the guarded `dict` and `namespace`; keys whose value is None are dropped from each message; the
template sees `messages`, `tools`, `documents`, `add_generation_prompt`, the tokenizer's named
special tokens (bos_token, eos_token, unk_token, sep_token, pad_token, cls_token, mask_token)
and the caller's keyword arguments, which override them (and add_generation_prompt, as
vLLM's chat_template_kwargs do). `continue_final_message` leaves the
last message open as transformers does (a tag appended to it, cut from the rendered text).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import DloraError

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                       "mask_token")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
_JINJA_CHARS = "{}\n"


class ChatTemplateError(DloraError):
    """The chat cannot be rendered (the template raised, or the request is not one it takes)."""


def load_chat_template(value: str) -> str:
    """`--chat-template VALUE` as vLLM reads it: the file's text, or VALUE itself when it is no
    readable file but looks like a template; ValueError if it looks like a path that fails."""
    try:
        return Path(value).expanduser().read_text(encoding="utf-8")
    except (OSError, ValueError) as exc:
        if not any(c in value for c in _JINJA_CHARS):
            raise ValueError(f"the chat template {value!r} looks like a file path, but it failed "
                             f"to be opened: {exc}") from None
        return value


def find_chat_template(folder: Path, tokenizer_config: Mapping[str, Any]) -> str | dict[str, str] | None:
    """The model folder's template(s), as transformers 5 loads them (None: there is none)."""
    templates: dict[str, str] = {}
    default = folder / "chat_template.jinja"
    if default.is_file():
        templates["default"] = default.read_text(encoding="utf-8")
    named = folder / "chat_templates"
    if named.is_dir():
        for path in sorted(named.glob("*.jinja")):
            templates[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    if templates:
        return templates["default"] if list(templates) == ["default"] else templates
    value = tokenizer_config.get("chat_template")
    if isinstance(value, list):
        return {t["name"]: t["template"] for t in value if isinstance(t, dict)}
    return value if isinstance(value, str) else None


def special_tokens(folder: Path, tokenizer_config: Mapping[str, Any]) -> dict[str, str]:
    """The named special tokens' texts the template sees (tokenizer_config.json, then the
    legacy special_tokens_map.json where the config has no `added_tokens_decoder`)."""
    values = {k: tokenizer_config.get(k) for k in SPECIAL_TOKEN_NAMES}
    legacy = folder / "special_tokens_map.json"
    if "added_tokens_decoder" not in tokenizer_config and legacy.is_file():
        extra = json.loads(legacy.read_text(encoding="utf-8"))
        for k in SPECIAL_TOKEN_NAMES:
            if not values.get(k) and extra.get(k):
                values[k] = extra[k]
    out: dict[str, str] = {}
    for k, v in values.items():
        text = v.get("content") if isinstance(v, dict) else v
        if isinstance(text, str):
            out[k] = text
    return out


def select_template(template: str | dict[str, str] | None) -> str:
    if template is None:
        raise ChatTemplateError("this model has no chat template, so chat requests cannot be "
                                "formatted; restart the server with --chat-template FILE (or use "
                                "/v1/completions)")
    if isinstance(template, dict):
        if "default" not in template:
            raise ChatTemplateError("this model has several chat templates and none named "
                                    f"'default' ({sorted(template)}); restart the server with "
                                    "--chat-template FILE")
        return template["default"]
    return template


def render_chat(template: str, messages: list[dict[str, Any]], *, add_generation_prompt: bool,
                continue_final_message: bool = False, tools: list[Any] | None = None,
                documents: list[Any] | None = None, variables: Mapping[str, Any] | None = None) -> str:
    """The prompt text `apply_chat_template(messages, tokenize=False, ...)` gives."""
    import jinja2

    if continue_final_message and add_generation_prompt:
        raise ChatTemplateError("continue_final_message and add_generation_prompt are not "
                                "compatible; set add_generation_prompt to false")
    chat = [_alias_reasoning({k: v for k, v in m.items() if v is not None}) for m in messages]
    final = ""
    if continue_final_message:
        final = _tag_final_message(template, chat)
    try:
        context = {"tools": tools, "documents": documents,
                   "add_generation_prompt": add_generation_prompt, **dict(variables or {})}
        text = _compile(template).render(context, messages=chat)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"the chat template refused the conversation: {exc.message or exc}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
        raise ChatTemplateError(f"the chat template failed on the conversation: "
                                f"{type(exc).__name__}: {exc}") from None
    if continue_final_message:
        tag = _CONTINUE_TAG.strip()
        if final.strip() not in text or tag not in text:
            raise ChatTemplateError("continue_final_message is set but the final message does not "
                                    "appear in the chat after applying the chat template")
        at = text.rindex(tag)
        text = text[:at] if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()
    return text


def _alias_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _tag_final_message(template: str, chat: list[dict[str, Any]]) -> str:
    """Append transformers' tag to the last message's content; returns that content."""
    if not chat or chat[-1].get("content") is None:
        raise ChatTemplateError('continue_final_message is set but the final message has no '
                                '"content" to continue')
    if "content" not in template:
        raise ChatTemplateError('continue_final_message is set but the chat template never reads '
                                '"content"')
    last = chat[-1]["content"]
    if isinstance(last, list):
        for block in reversed(last):
            if isinstance(block, dict) and "text" in block:
                final = str(block["text"])
                block["text"] = final + _CONTINUE_TAG
                return final
        raise ChatTemplateError("continue_final_message is set but the final message has no text")
    chat[-1]["content"] = str(last) + _CONTINUE_TAG
    return str(last)


@lru_cache(maxsize=16)
def _compile(template: str) -> Any:
    """The template compiled in transformers' sandbox (cached: templates are long)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}`: renders its body (transformers uses it to
        find the assistant's tokens, which a server never needs)."""

        tags = {"generation"}

        def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Callable[[], str]) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    class TemplateDict:
        def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805  (Jinja's own signature)
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes on a namespace ({name!r})")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env.from_string(template)
