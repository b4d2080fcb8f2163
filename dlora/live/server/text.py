"""Text in and out of the server: the model folder's `tokenizer.json` (the `tokenizers`
package), the chat template (tokenizer_config.json's Jinja `chat_template` when present, else
"role: content" lines ending in "assistant:"), incremental detokenization and stop strings
(an incomplete UTF-8 tail is held back until the next token completes it, and comes out as
U+FFFD if the request ends first)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...errors import ModelError

REPLACEMENT = "\ufffd"  # an incomplete UTF-8 sequence so far: wait for the next token


class TextCodec:
    """Tokenizer plus chat template of one model folder."""

    def __init__(self, folder: Path) -> None:
        from tokenizers import Tokenizer

        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ModelError(f"{folder}: no tokenizer.json; the server needs the model's fast tokenizer file")
        self.tokenizer = Tokenizer.from_file(str(path))
        cfg: dict[str, Any] = {}
        cfg_path = folder / "tokenizer_config.json"
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text())
        self.chat_template: str | None = cfg.get("chat_template") if isinstance(cfg.get("chat_template"), str) else None
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=True).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        if self.chat_template is not None:
            import jinja2

            env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=True,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        lines = [f"{m['role']}: {m.get('content') or ''}" for m in messages]
        return "\n".join([*lines, "assistant:"])


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Detokenizer:
    """Turns a growing list of token ids into text deltas; cuts at the first stop string and
    holds back text that could be the start of one."""

    def __init__(self, codec: TextCodec, stop: Sequence[str] = ()) -> None:
        self.codec = codec
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""  # decoded so far
        self.sent = 0  # characters of `text` already returned
        self.stopped = False

    def add(self, token_id: int) -> str:
        """The new text to send after `token_id` (may be empty)."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        text = self.codec.decode(self.ids)
        if text.endswith(REPLACEMENT):  # maybe the start of a character the next token ends
            return ""
        return self._update(text)

    def _update(self, text: str) -> str:
        self.text = text
        for s in self.stop:
            at = text.find(s, max(0, self.sent - len(s)))
            if at >= 0:
                self.stopped = True
                self.text = text[:at]
                return self._take(len(self.text))
        hold = max((len(s) - 1 for s in self.stop), default=0)
        return self._take(max(self.sent, len(text) - hold))

    def flush(self) -> str:
        """Everything left (the request ended). Trailing bytes that never completed a
        character come out as U+FFFD, as Hugging Face's decode (errors="replace") gives them."""
        if self.stopped:
            return ""
        text = self.codec.decode(self.ids)
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
