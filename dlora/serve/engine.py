"""ServingEngine: what the HTTP layer talks to. Owns the live cluster (dlora.live.LiveCluster:
the same scheduler objects as `simulate`, driven by one worker thread per replica), the model's
text codec, the adapter registry and one token stream per request.

`submit(...)` checks a request (model name, context length, overload) and dispatches it,
raising `ServeError`s the app turns into OpenAI-shaped errors; it returns a `Generation`, an
async iterator of token ids fed by the cluster's `on_token` / `on_finish` callbacks (worker
threads hand tokens to the request's event loop). Closing a generation before it ends aborts
the request in the scheduler, which frees its KV blocks and its slot in the batch.

Adapter unload: the name disappears at once (new requests get 404); requests already
admitted for it run to completion; its weights leave every replica when the last one ends.
Runtime loading and unloading are off unless `allow_runtime_lora` (403, as vLLM without
VLLM_ALLOW_RUNTIME_LORA_UPDATING); with `allowed_adapter_roots` a load from anywhere else is
refused with one 403 that says nothing about the path (whether it exists, why it failed).

Faults: prompt token ids outside [0, vocab) are a 400 here; a request the executor fails alone
ends with finish_reason "error" (the app answers 500 with `Request.error`); an adapter blamed
for non-finite logits, or that a replica cannot serve, is disabled: its requests get 400 until
it is unloaded and loaded again (a new id). A replica that keeps failing is marked dead and
rebuilt (`ServingExecutor.restart`: a new TorchExecutor, or a new Ray actor), then revived;
with no live replica a request is 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..build import load_latency, make_cluster
from ..errors import AdapterError, DloraError
from ..live.engine import LiveCluster
from ..types import Adapter, Request, SamplingParams
from .config import ServeConfig, serve_scenario
from .metrics import ServerMetrics
from .replicas import drop_from_devices, torch_serving_executors
from .text import TextCodec

log = logging.getLogger(__name__)
_END = object()


class ServeError(DloraError):
    """A request the server refuses; `status` is the HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
        self.retry_after_s = retry_after_s


@dataclass(slots=True)
class AdapterEntry:
    id: int
    name: str
    path: str
    rank: int
    draining: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationParams(SamplingParams):
    """A served request's sampling: `SamplingParams` with the API's defaults (temperature 1,
    stop at EOS) and its token limit."""

    max_tokens: int
    temperature: float = 1.0
    ignore_eos: bool = False

    def sampling(self) -> SamplingParams:
        return SamplingParams(**{f.name: getattr(self, f.name) for f in fields(SamplingParams)})


class Generation:
    """Token ids of one request as they are produced; `request` holds the counters and the
    finish reason at the end. `close()` (or leaving `async for` early) aborts the request."""

    def __init__(self, engine: ServingEngine, request: Request) -> None:
        self.engine, self.request = engine, request
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self.ended = False

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> int:
        if self.ended:
            raise StopAsyncIteration
        item = await self.queue.get()
        if item is _END:
            self.ended = True
            raise StopAsyncIteration
        return int(item)

    async def next(self, timeout_s: float) -> int | None:
        """The next token id, None at the end; TimeoutError if none comes within `timeout_s`."""
        if self.ended:
            return None
        item = await asyncio.wait_for(self.queue.get(), timeout_s)
        if item is _END:
            self.ended = True
            return None
        return int(item)

    def close(self) -> None:
        """Abort the request if it has not ended (client gone, stop string reached)."""
        if not self.ended and not self.request.is_done:
            self.engine.live.abort(self.request.id)
        self.ended = True


class ServingEngine:
    def __init__(self, cfg: ServeConfig, *, enable_prefix_caching: bool = True) -> None:
        """`enable_prefix_caching`: vLLM's automatic prefix caching (on by default, as in vLLM
        v1): prompt KV blocks are shared between requests of the same adapter and kept for reuse."""
        from ..exec.adapters import load_adapter
        from ..exec.demo import demo_adapter_paths, ensure_demo
        from ..exec.loader import parse_config

        self.cfg = cfg
        self.max_queue = cfg.max_queue  # may be changed while serving
        self.folder = Path(cfg.model).expanduser().resolve() if cfg.model else ensure_demo()
        self.model_name = cfg.served_model_name or (self.folder.name if cfg.model else "dlora-demo")
        self.codec = TextCodec(self.folder)
        self.model_config = parse_config(self.folder)
        self._load_adapter = load_adapter
        modules = cfg.lora_modules
        if not modules and cfg.model is None:
            modules = tuple((p.name, str(p)) for p in demo_adapter_paths(self.folder).values())
        self.max_context_tokens = self.model_config.max_positions
        self.adapters: dict[str, AdapterEntry] = {}
        self.adapter_names: dict[int, str] = {}  # every id ever used (metrics of drained ones)
        self._next_adapter = 0
        table: dict[int, Adapter] = {}
        for name, path in modules:
            entry, adapter = self._validate(name, path)
            self.adapters[name] = entry
            table[entry.id] = adapter
        scenario = serve_scenario(cfg)
        latency = load_latency(scenario)
        self.prefix_caching = enable_prefix_caching
        cluster, migrator = make_cluster(scenario, latency, table, prefix_caching=enable_prefix_caching)
        sources = {e.id: e.path for e in self.adapters.values()}
        if cfg.ray_address is not None:
            from .ray_backend import ray_serving_executors

            self.executors = ray_serving_executors(cfg, self.folder, sources, cluster)
        else:
            import torch

            device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
            self.executors = torch_serving_executors(
                self.folder, sources, cluster, device=device, block_size=cfg.block_size,
                max_loras=cfg.max_loras, seed=cfg.seed, max_cpu_loras=cfg.max_cpu_loras)
        self.live = LiveCluster(
            cluster, migrator, self.executors, on_token=self._on_token, on_finish=self._on_finish,
            max_step_failures=1 if cfg.ray_address is not None else cfg.max_step_failures,
            retain_requests=False, max_context_tokens=self.max_context_tokens, require_token_ids=True,
            restart=lambda i: self.executors[i].restart())
        self.allowed_roots = tuple(Path(r).expanduser().resolve() for r in cfg.allowed_adapter_roots)
        if cfg.allow_runtime_lora and not self.allowed_roots:
            log.warning("runtime adapter loading is on with no --allowed-adapter-root: any folder "
                        "this process can read may be loaded")
        self.metrics = ServerMetrics(self)
        self._streams: dict[int, Generation] = {}
        self._outstanding: Counter[int | None] = Counter()
        self._lock = threading.Lock()  # adapters, streams, outstanding
        self.started = False

    # ---- life cycle ----
    def start(self) -> None:
        if not self.started:
            self.live.start()
            self.started = True

    def stop(self) -> None:
        if self.started:
            self.live.stop()
            self.started = False
        close = getattr(self.executors[0].inner, "close_backend", None) if self.executors else None
        if close is not None:
            close(self.executors)

    @property
    def num_unfinished(self) -> int:
        return self.live.unfinished

    def registered_adapters(self) -> dict[int, str]:
        """Adapter id -> name of the adapters served now (a copy, taken under the engine's lock)."""
        with self._lock:
            return {a.id: a.name for a in self.adapters.values()}

    # ---- adapters ----
    def _validate(self, name: str, path: str) -> tuple[AdapterEntry, Adapter]:
        """Read and check an adapter folder on the host (raises AdapterError)."""
        if name == self.model_name:
            raise AdapterError(f"adapter {name!r}: the name is the base model's; choose another")
        lora = self._load_adapter(path, self.model_config, name=name)
        rank = max((m.rank for m in lora.modules.values()), default=lora.rank)
        if rank > self.cfg.max_lora_rank:
            raise AdapterError(f"adapter {name!r}: rank {rank} is above --max-lora-rank "
                               f"{self.cfg.max_lora_rank}; restart the server with a larger bound")
        aid = self._next_adapter
        self._next_adapter += 1
        self.adapter_names[aid] = name
        targets = tuple(t.removesuffix("_proj") for t in lora.target_modules)
        return (AdapterEntry(aid, name, str(Path(path).resolve()), rank),
                Adapter(aid, name, lora.rank, lora.size_bytes, targets, str(path)))

    def _check_runtime_lora(self) -> None:
        if not self.cfg.allow_runtime_lora:
            raise ServeError(403, "runtime adapter loading and unloading are off on this server; "
                                  "restart it with --allow-runtime-lora (or "
                                  "VLLM_ALLOW_RUNTIME_LORA_UPDATING=true)", "PermissionDeniedError")

    def _check_allowed(self, path: str) -> None:
        """403 unless `path` (symbolic links resolved) lies under an allowed root; the same
        answer whether or not it exists."""
        if not self.allowed_roots:
            return
        try:
            real = Path(path).expanduser().resolve()
        except (OSError, RuntimeError, ValueError):
            real = None
        if real is None or not any(real.is_relative_to(root) for root in self.allowed_roots):
            raise ServeError(403, "the adapter path is not under an allowed adapter root of this "
                                  "server (--allowed-adapter-root)", "PermissionDeniedError", "lora_path")

    def load_adapter(self, name: str, path: str) -> AdapterEntry:
        """Register an adapter on every replica; raises ServeError (400) if it cannot be, 403
        where runtime loading is off or the path is outside the allowed roots."""
        self._check_runtime_lora()
        for param, text in (("lora_name", name), ("lora_path", path)):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ServeError(400, f"{param}: not valid Unicode (a lone surrogate)",
                                 "BadRequestError", param) from None
        self._check_allowed(path)
        with self._lock:
            if name in self.adapters:
                raise ServeError(400, f"the adapter {name!r} is already loaded; unload it first")
            try:
                entry, adapter = self._validate(name, path)
            except AdapterError as exc:
                raise ServeError(400, str(exc), param="lora_path") from None
            with self.live.lock:
                self.live.cluster.register_adapter(adapter)
            for ex in self.executors:
                ex.register_adapter(entry.id, entry.path)
            self.adapters[name] = entry
        log.info("loaded adapter %s (id %d, rank %d) from %s", name, entry.id, entry.rank, path)
        return entry

    def unload_adapter(self, name: str) -> int:
        """Remove the name now; returns how many of its requests still run to completion."""
        self._check_runtime_lora()
        with self._lock:
            entry = self.adapters.pop(name, None)
            if entry is None:
                raise ServeError(404, f"the adapter {name!r} is not loaded", "NotFoundError", "lora_name")
            entry.draining = True
            left = self._outstanding[entry.id]
            if left == 0:
                self._drop(entry.id)
        log.info("unloaded adapter %s (%d requests finish first)", name, left)
        return left

    def _drop(self, adapter_id: int) -> None:
        with self.live.lock:
            drop_from_devices(self.live.cluster, adapter_id)
        for ex in self.executors:
            ex.unregister_adapter(adapter_id)

    def resolve_model(self, model: str) -> int | None:
        """The adapter id `model` names (None: the base model); ServeError 404 if unknown."""
        if model == self.model_name:
            return None
        entry = self.adapters.get(model)
        if entry is None:
            raise ServeError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        reason = self.live.adapter_faults.get(entry.id)
        if reason is not None:
            raise ServeError(400, f"The model `{model}` is disabled: a request under it failed "
                                  f"({reason}); unload it and load a fixed copy", "BadRequestError", "model")
        return entry.id

    def failure(self, request: Request) -> str:
        """Why a request that failed alone (finish_reason "error") failed, for its client."""
        text = f"the request failed: {request.error or 'unknown error'}"
        aid = request.adapter_id
        if aid is not None and aid in self.live.adapter_faults:
            text += (f" (adapter `{self.adapter_names.get(aid, aid)}`, disabled now, until it is "
                     "unloaded and loaded again)")
        return text

    # ---- requests ----
    def submit(self, model: str, prompt_ids: Sequence[int], params: GenerationParams) -> Generation:
        """Admit and dispatch a request (call from the event loop that will read it)."""
        adapter_id = self.resolve_model(model)
        n = len(prompt_ids)
        if n == 0:
            raise ServeError(400, "the prompt is empty", param="prompt")
        if n + params.max_tokens > self.max_context_tokens:
            raise ServeError(400, f"This model's maximum context length is {self.max_context_tokens} "
                                  f"tokens. However, you requested {n + params.max_tokens} tokens ({n} in "
                                  f"the prompt, {params.max_tokens} in the completion). Please reduce "
                                  "the prompt or max_tokens.", param="max_tokens")
        vocab = self.model_config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            bad = next(t for t in prompt_ids if not 0 <= t < vocab)
            raise ServeError(400, f"prompt token id {bad} is outside the model's vocabulary "
                                  f"[0, {vocab})", "BadRequestError", "prompt")
        if self.live.unfinished >= self.max_queue:
            raise ServeError(429, f"the server holds {self.live.unfinished} unfinished requests "
                                  f"(--max-queue {self.max_queue}); retry later",
                             "RateLimitError", retry_after_s=1)
        sp = params.sampling()
        request = Request(self.live.next_request_id(), adapter_id, 0.0, n, params.max_tokens,
                          prompt_token_ids=tuple(int(t) for t in prompt_ids), sampling=sp)
        gen = Generation(self, request)
        with self._lock:
            if adapter_id is not None and adapter_id not in self._active_ids():
                raise ServeError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
            self._streams[request.id] = gen
            self._outstanding[adapter_id] += 1
        if not self.live.submit(request):
            if not any(rep.is_alive for rep in self.live.cluster.replicas):
                raise ServeError(503, "no live replica: every replica has failed and is being "
                                      "restarted; retry later", "ServiceUnavailableError",
                                 retry_after_s=1)
            raise ServeError(400, f"the request cannot be served: {request.finish_reason}")
        return gen

    def _on_token(self, request: Request, token_id: int) -> None:
        gen = self._streams.get(request.id)
        if gen is not None:
            gen.loop.call_soon_threadsafe(gen.queue.put_nowait, token_id)

    def _on_finish(self, request: Request) -> None:
        with self._lock:
            gen = self._streams.pop(request.id, None)
            aid = request.adapter_id
            self._outstanding[aid] -= 1
            if self._outstanding[aid] <= 0:
                del self._outstanding[aid]
                if aid is not None and aid not in self._active_ids():
                    self._drop(aid)  # the last request of an unloaded adapter
        self.metrics.observe_finished(request)
        if gen is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed (server shutting down)
                gen.loop.call_soon_threadsafe(gen.queue.put_nowait, _END)

    def _active_ids(self) -> set[int]:
        return {e.id for e in self.adapters.values()}

    def outstanding(self, adapter_id: int | None) -> int:
        with self._lock:
            return self._outstanding[adapter_id]
