"""Helpers of the server tests: an adapter with huge finite weights and the poison request that
bypasses the API's checks (the fault tests, issue 15, defect 1), waiting (a module of its own:
`conftest` is a name several test folders share)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from dlora.exec.demo import demo_adapter_paths, ensure_demo
from dlora.types import Request, SamplingParams

HUGE = 1e30  # finite in float32; the LoRA side path overflows to inf, the logits to nan


def huge_adapter(folder: Path) -> Path:
    """A copy of the demo's alpha-r4 whose every LoRA weight is 1e30 (it loads: finite)."""
    from safetensors.torch import load_file, save_file

    src = demo_adapter_paths(ensure_demo())[0]
    if folder.exists():
        return folder
    shutil.copytree(src, folder)
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    save_file({k: v.clone().fill_(HUGE) for k, v in tensors.items()}, str(path))
    return folder


def raw_request(live, prompt: tuple[int, ...], max_tokens: int = 3, adapter_id: int | None = None) -> Request:
    """A request straight into the live cluster (no API checks): the executor's guard."""
    return Request(live.next_request_id(), adapter_id, 0.0, len(prompt), max_tokens,
                   prompt_token_ids=prompt, sampling=SamplingParams(temperature=0.0, ignore_eos=True))




def wait_until(cond, timeout_s: float = 30.0, poll_s: float = 0.02) -> bool:
    """Poll `cond` until it holds or `timeout_s` passes; its last answer."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(poll_s)
    return cond()


def wait_healthy(url: str, proc, timeout_s: float = 60.0) -> bool:
    """Wait until a `dlora serve` subprocess answers /health (False if it exits first)."""
    import httpx

    def up() -> bool:
        try:
            return httpx.get(url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return proc.poll() is not None

    return wait_until(up, timeout_s) and proc.poll() is None
