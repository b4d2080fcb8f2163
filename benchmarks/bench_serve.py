"""Load benchmark of `dlora serve` (loopback only, bounded): starts the server in a subprocess
(the embedded demo model and its 4 adapters), then N concurrent clients send a fixed number of
requests (or stop at a fixed duration) over mixed adapters and the base model, half streamed.
Prints requests/s, latency and TTFT percentiles, errors by kind, and the server's resident
memory at start (after a warm-up) and at the end.

    .venv/bin/python benchmarks/bench_serve.py --requests 400 --clients 16
    .venv/bin/python benchmarks/bench_serve.py --requests 200 --clients 32 --max-queue 8   # overload
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np

MODELS = ["dlora-demo", "alpha-r4", "beta-r8", "gamma-r8", "delta-r16"]
WEIGHTS = [0.1, 0.4, 0.25, 0.15, 0.1]  # skewed popularity


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def one_request(http: httpx.Client, i: int, model: str, max_tokens: int, stream: bool) -> tuple[str, float, float]:
    """(outcome, latency s, ttft s)."""
    body = {"model": model, "prompt": f"request {i}: the quick brown fox " * (1 + i % 4),
            "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, "stream": stream}
    t0 = time.perf_counter()
    ttft = float("nan")
    try:
        if stream:
            with http.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    return f"http {r.status_code}", time.perf_counter() - t0, ttft
                for line in r.iter_lines():
                    if line.startswith("data: {") and ttft != ttft:
                        ttft = time.perf_counter() - t0
            return "ok", time.perf_counter() - t0, ttft
        r = http.post("/v1/completions", json=body)
        lat = time.perf_counter() - t0
        if r.status_code != 200:
            return f"http {r.status_code}", lat, ttft
        if r.json()["usage"]["completion_tokens"] != max_tokens:
            return "short", lat, ttft
        return "ok", lat, lat
    except httpx.HTTPError as exc:
        return type(exc).__name__, time.perf_counter() - t0, ttft


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--duration", type=float, default=120.0, help="stop sending after this many seconds")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--policy", default="credit")
    ap.add_argument("--max-queue", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ray", action="store_true", help="replicas as Ray actors (a local Ray)")
    args = ap.parse_args()

    port = free_port()
    cmd = [sys.executable, "-m", "dlora.cli", "serve", "--port", str(port), "--replicas", str(args.replicas),
           "--policy", args.policy, "--max-queue", str(args.max_queue), "--log-level", "warning"]
    if args.ray:
        cmd.append("--ray")
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.2)
        rng = np.random.default_rng(args.seed)
        plan = [(i, str(rng.choice(MODELS, p=WEIGHTS)), bool(i % 2)) for i in range(args.requests)]
        with httpx.Client(base_url=base, timeout=300) as http:
            for m in MODELS:  # warm-up: every adapter once
                one_request(http, 0, m, 2, False)
        rss0 = rss_mib(server.pid)
        results: list[tuple[str, float, float]] = []
        lock = threading.Lock()
        stop_at = time.monotonic() + args.duration
        local = threading.local()

        def run(item: tuple[int, str, bool]) -> None:
            if time.monotonic() > stop_at:
                return
            if not hasattr(local, "http"):
                local.http = httpx.Client(base_url=base, timeout=300)
            out = one_request(local.http, item[0], item[1], args.max_tokens, item[2])
            with lock:
                results.append(out)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(run, plan))
        wall = time.perf_counter() - t0
        rss1 = rss_mib(server.pid)
        metrics = httpx.get(base + "/metrics").text
    finally:
        server.terminate()
        server.wait(30)

    kinds = Counter(k for k, _, _ in results)
    ok = [lat for k, lat, _ in results if k == "ok"]
    ttft = [t for k, _, t in results if k == "ok" and t == t]
    switches = sum(float(x.rsplit(" ", 1)[1]) for x in metrics.splitlines() if x.startswith("dlora_mode_switches_total"))

    def pct(v: list[float], q: float) -> str:
        return f"{np.percentile(v, q) * 1e3:.0f}" if v else "-"

    rows = [
        ("requests sent / ok", f"{len(results)} / {len(ok)}"),
        ("errors", ", ".join(f"{k}: {n}" for k, n in kinds.items() if k != "ok") or "0"),
        ("clients / replicas / policy", f"{args.clients} / {args.replicas}{' Ray' if args.ray else ''} / {args.policy}"),
        ("max_tokens / max-queue", f"{args.max_tokens} / {args.max_queue}"),
        ("wall (s)", f"{wall:.2f}"),
        ("requests/s", f"{len(ok) / wall:.1f}"),
        ("output tokens/s", f"{len(ok) * args.max_tokens / wall:.0f}"),
        ("latency p50 / p90 / p99 (ms)", f"{pct(ok, 50)} / {pct(ok, 90)} / {pct(ok, 99)}"),
        ("TTFT p50 / p90 (ms)", f"{pct(ttft, 50)} / {pct(ttft, 90)}"),
        ("mode switches", f"{switches:.0f}"),
        ("server RSS start / end (MiB)", f"{rss0:.0f} / {rss1:.0f} ({rss1 - rss0:+.0f})"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"{'bench_serve':<{width}}  value")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(json.dumps({"ok": len(ok), "errors": {k: n for k, n in kinds.items() if k != "ok"},
                      "rps": len(ok) / wall, "rss_start_mib": rss0, "rss_end_mib": rss1}))


if __name__ == "__main__":
    main()
