"""`dlora serve`: the OpenAI-compatible HTTP API over the live cluster (`dlora.serve`)."""

from __future__ import annotations

from typing import Annotated

import typer

from ..errors import DloraError
from .common import err, fail


def serve_cmd(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Option("--model", help="Hugging Face Llama folder (the embedded demo if unset)")] = None,
    lora_modules: Annotated[list[str] | None, typer.Option("--lora-modules", help="name=path (repeat, or list after one flag)")] = None,
    served_model_name: Annotated[str | None, typer.Option("--served-model-name", help="the base model's name in the API")] = None,
    max_loras: Annotated[int, typer.Option("--max-loras", help="adapter slots on the device per replica (vLLM's default is 1; dlora batches several adapters per iteration, so 4)")] = 4,
    max_lora_rank: Annotated[int, typer.Option("--max-lora-rank", help="refuse adapters of higher rank (vLLM's default is 16 and it reserves every slot at that rank; dlora packs each adapter at its own rank, so a high bound reserves no memory)")] = 64,
    max_cpu_loras: Annotated[int | None, typer.Option("--max-cpu-loras", help="adapters kept in host memory per replica, an LRU cache as in vLLM (others are read again from their folder on next use); must be >= --max-loras; unset: all (vLLM: --max-loras)")] = None,
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 8000,
    replicas: Annotated[int, typer.Option("--replicas", help="replicas (one executor each)")] = 1,
    policy: Annotated[str, typer.Option("--policy", help="batching policy (credit = dLoRA)")] = "credit",
    dispatch: Annotated[str, typer.Option("--dispatch", help="dispatcher")] = "least_loaded",
    migration: Annotated[str, typer.Option("--migration", help="migrator")] = "none",
    max_queue: Annotated[int, typer.Option("--max-queue", help="unfinished requests before 429")] = 256,
    max_batch_size: Annotated[int, typer.Option("--max-num-seqs", help="sequences per iteration")] = 16,
    max_batched_tokens: Annotated[int, typer.Option("--max-num-batched-tokens")] = 512,
    memory_fraction: Annotated[float, typer.Option("--memory-fraction", help="share of the profile's KV memory")] = 0.01,
    profile: Annotated[str | None, typer.Option("--profile", help="latency profile YAML")] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu | cuda")] = None,
    ray: Annotated[bool, typer.Option("--ray", help="replicas as Ray actors (a local Ray unless --ray-address)")] = False,
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="Ray cluster to join (implies --ray)")] = None,
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
    api_key: Annotated[str | None, typer.Option("--api-key", envvar=["DLORA_API_KEY", "VLLM_API_KEY"], show_envvar=True, help="require `Authorization: Bearer KEY` on every /v1 route (401 without)")] = None,
    allow_runtime_lora: Annotated[bool, typer.Option("--allow-runtime-lora/--no-allow-runtime-lora", envvar=["DLORA_ALLOW_RUNTIME_LORA_UPDATING", "VLLM_ALLOW_RUNTIME_LORA_UPDATING"], show_envvar=True, help="allow /v1/load_lora_adapter and /v1/unload_lora_adapter (off: 403, as vLLM)")] = False,
    allowed_adapter_roots: Annotated[list[str] | None, typer.Option("--allowed-adapter-root", help="runtime loads only from under this folder (repeat for several)")] = None,
    chat_template: Annotated[str | None, typer.Option("--chat-template", help="chat template: a Jinja file, or the template itself (as vLLM's); replaces the model folder's")] = None,
    enable_prefix_caching: Annotated[bool, typer.Option("--enable-prefix-caching/--no-enable-prefix-caching", help="share and keep prompt KV blocks between requests of the same adapter (vLLM's automatic prefix caching; on by default, as in vLLM v1)")] = True,
) -> None:
    """Serve the OpenAI API (completions, chat, models, LoRA load/unload, metrics) over the live cluster."""
    from ..serve import ServeConfig, ServingEngine, bind_socket, parse_lora_modules, serve
    from ..serve.chat_template import load_chat_template

    try:
        template = load_chat_template(chat_template) if chat_template is not None else None
    except ValueError as exc:
        fail(f"--chat-template: {exc}")
    sock = None
    try:
        sock = bind_socket(host, port)  # a taken port fails here, before the model is built
        cfg = ServeConfig(
            model=model, served_model_name=served_model_name,
            lora_modules=parse_lora_modules([*(lora_modules or []), *ctx.args]), max_loras=max_loras,
            max_lora_rank=max_lora_rank, max_cpu_loras=max_cpu_loras, replicas=replicas, policy=policy,
            dispatch=dispatch, migration=migration, max_queue=max_queue, max_batch_size=max_batch_size,
            max_batched_tokens=max_batched_tokens, memory_fraction=memory_fraction, profile=profile,
            device=device, ray_address=ray_address or ('local' if ray else None), api_key=api_key,
            allow_runtime_lora=allow_runtime_lora, allowed_adapter_roots=tuple(allowed_adapter_roots or ()))
        engine = ServingEngine(cfg, enable_prefix_caching=enable_prefix_caching)
        if template is not None:
            engine.codec.chat_template = template
    except DloraError as exc:
        if sock is not None:
            sock.close()
        fail(str(exc))
    err.print(f"dlora serve: {engine.model_name} with {len(engine.adapters)} adapters on "
              f"http://{host}:{port}/v1 ({replicas} replica(s){', Ray' if engine.cfg.ray_address else ''}"
              f"{', API key required' if api_key else ''}"
              f"{', runtime adapter loading on' if allow_runtime_lora else ''})", highlight=False)
    serve(engine, host, port, log_level, sock=sock)
