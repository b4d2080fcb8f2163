"""Text in and out of the server: the model folder's `tokenizer.json` (the `tokenizers`
package), its chat template (chat_template.py: found and rendered as transformers 5 does, or
given by `--chat-template`; without one, chat requests are refused), incremental
detokenization and stop strings (an incomplete UTF-8 tail is held back until the next token
completes it, and comes out as U+FFFD if the request ends first)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ModelError
from .chat_template import find_chat_template, render_chat, select_template, special_tokens

REPLACEMENT = "\ufffd"  # an incomplete UTF-8 sequence so far: wait for the next token


class TextCodec:
    """Tokenizer plus chat template of one model folder; `chat_template` (the text of one
    template) replaces the folder's."""

    def __init__(self, folder: Path, chat_template: str | None = None) -> None:
        from tokenizers import Tokenizer

        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ModelError(f"{folder}: no tokenizer.json; the server needs the model's fast tokenizer file")
        self.tokenizer = Tokenizer.from_file(str(path))
        cfg: dict[str, Any] = {}
        cfg_path = folder / "tokenizer_config.json"
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text())
        self.chat_template: str | dict[str, str] | None = (
            chat_template if chat_template is not None else find_chat_template(folder, cfg))
        self.special_tokens = special_tokens(folder, cfg)
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def render_chat(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                    continue_final_message: bool = False,
                    variables: Mapping[str, Any] | None = None, tools: list[Any] | None = None,
                    documents: list[Any] | None = None) -> str:
        """The prompt text, as `apply_chat_template(messages, tokenize=False, ...)` renders it
        (`variables`: chat_template_kwargs, over the special tokens); ChatTemplateError if the
        model has no template or the template refuses the conversation. Encode the result with
        `encode(text, add_special_tokens=False)`: the template placed the special tokens."""
        return render_chat(select_template(self.chat_template), messages,
                           add_generation_prompt=add_generation_prompt,
                           continue_final_message=continue_final_message, tools=tools,
                           documents=documents, variables={**self.special_tokens, **(variables or {})})


class Detokenizer:
    """Turns a growing list of token ids into text deltas; cuts at the first stop string and
    holds back text that could be the start of one. `include_stop`: the text keeps the stop
    string it ends with (vLLM's include_stop_str_in_output)."""

    def __init__(self, codec: TextCodec, stop: Sequence[str] = (), *, include_stop: bool = False,
                 skip_special_tokens: bool = True) -> None:
        self.codec = codec
        self.stop = tuple(s for s in stop if s)
        self.include_stop, self.skip_special_tokens = include_stop, skip_special_tokens
        self.ids: list[int] = []
        self.text = ""  # decoded so far
        self.sent = 0  # characters of `text` already returned
        self.stopped = False

    def add(self, token_id: int) -> str:
        """The new text to send after `token_id` (may be empty)."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        text = self.codec.decode(self.ids, self.skip_special_tokens)
        if text.endswith(REPLACEMENT):  # maybe the start of a character the next token ends
            return ""
        return self._update(text)

    def _update(self, text: str) -> str:
        self.text = text
        for s in self.stop:
            at = text.find(s, max(0, self.sent - len(s)))
            if at >= 0:
                self.stopped = True
                self.text = text[:at + len(s) if self.include_stop else at]
                return self._take(len(self.text))
        hold = max((len(s) - 1 for s in self.stop), default=0)
        return self._take(max(self.sent, len(text) - hold))

    def flush(self) -> str:
        """Everything left (the request ended). Trailing bytes that never completed a
        character come out as U+FFFD, as Hugging Face's decode (errors="replace") gives them."""
        if self.stopped:
            return ""
        text = self.codec.decode(self.ids, self.skip_special_tokens)
        if text != self.text:
            out = self._update(text)
            if self.stopped:
                return out
            return out + self._take(len(self.text))
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        out = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return out
