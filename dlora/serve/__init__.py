"""`dlora serve`: an OpenAI-compatible multi-LoRA server on the live cluster (DESIGN.md
section 7). `ServingEngine(ServeConfig(...))` builds the replicas; `create_app(engine)` is
the FastAPI app; `serve(engine, host, port)` runs it; `BackgroundServer` runs it on a thread."""

from __future__ import annotations

from .app import create_app
from .config import ServeConfig, parse_lora_modules
from .engine import Generation, GenerationParams, ServeError, ServingEngine
from .run import BackgroundServer, bind_socket, serve

__all__ = [
    "BackgroundServer",
    "Generation",
    "GenerationParams",
    "ServeConfig",
    "ServeError",
    "ServingEngine",
    "bind_socket",
    "create_app",
    "parse_lora_modules",
    "serve",
]
