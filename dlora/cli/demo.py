"""`dlora init-demo`: the embedded tiny model and adapters written to a folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import out, user_errors


def init_demo(directory: Annotated[Path, typer.Argument(help="folder to write the demo model into")]) -> None:
    """Write the embedded tiny Llama model, tokenizer and PEFT adapters (seeded, no download)."""
    with user_errors():
        from ..exec.demo import write_demo

        path = write_demo(directory)
    out.print(f"wrote demo model and adapters to {path}")
