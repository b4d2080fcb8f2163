"""Access control and small API edges of `dlora serve` (issue 15, defects 4, 7 and 8): the API
key on every /v1 route (401 in OpenAI's shape; /health and /metrics open), the runtime-loading
switch, allowed adapter roots (a load elsewhere is refused alike whether or not the path
exists), the incomplete UTF-8 tail of a completion as U+FFFD, `max_completion_tokens: 0`, lone
surrogates, and a taken port failing before the banner."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys

import httpx
import openai
import pytest

from dlora.exec.demo import demo_adapter_paths, ensure_demo
from dlora.serve import BackgroundServer, ServeConfig, ServingEngine
from dlora.serve.text import Detokenizer, TextCodec

KEY = "sekrit-key"

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter-root")
    shutil.copytree(demo_adapter_paths(ensure_demo())[1], root / "beta-copy")
    (root / "escape").symlink_to(demo_adapter_paths(ensure_demo())[2])  # points outside the root
    return root


@pytest.fixture(scope="module")
def server(roots):
    engine = ServingEngine(ServeConfig(replicas=1, api_key=KEY, allow_runtime_lora=True,
                                       allowed_adapter_roots=(str(roots),)))
    engine.codec.chat_template = CHAT_TEMPLATE  # the demo model has none
    with BackgroundServer(engine) as srv:
        yield srv


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("headers", [{}, auth("wrong"), {"Authorization": KEY}, {"Authorization": "Basic x"}])
@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
    ("POST", "/v1/load_lora_adapter"), ("POST", "/v1/unload_lora_adapter")])
def test_every_v1_route_needs_the_key(server, headers, method, path):
    r = httpx.request(method, server.url + path, headers=headers, json={"model": "dlora-demo", "prompt": "x"})
    assert r.status_code == 401
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == 401
    assert r.headers["www-authenticate"] == "Bearer"


def test_with_the_key_the_api_answers_and_health_and_metrics_stay_open(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    assert client.completions.create(model="alpha-r4", prompt="x", max_tokens=2).usage.completion_tokens == 2
    assert "dlora-demo" in {m.id for m in client.models.list().data}
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200


def load(server, name: str, path: str) -> httpx.Response:
    return httpx.post(server.url + "/v1/load_lora_adapter", headers=auth(), timeout=30,
                      json={"lora_name": name, "lora_path": path})


def test_loads_outside_the_allowed_roots_are_refused_alike(server, roots, tmp_path):
    outside = [str(demo_adapter_paths(ensure_demo())[0]), str(tmp_path / "no-such-folder"), "/etc",
               str(roots / ".." / roots.name / ".." / "x"), str(roots / "escape")]
    answers = set()
    for i, path in enumerate(outside):
        r = load(server, f"x{i}", path)
        assert r.status_code == 403, (path, r.text)
        answers.add(r.json()["error"]["message"])
    assert len(answers) == 1  # says nothing about the path: the same for every one
    assert "exist" not in answers.pop()
    assert load(server, "inside", str(roots / "beta-copy")).status_code == 200
    r = load(server, "missing", str(roots / "missing"))  # inside: the reason may be told
    assert r.status_code == 400 and "does not exist" in r.json()["error"]["message"]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    assert client.completions.create(model="inside", prompt="x", max_tokens=2).usage.completion_tokens == 2
    r = httpx.post(server.url + "/v1/unload_lora_adapter", headers=auth(), json={"lora_name": "inside"})
    assert r.status_code == 200


def test_runtime_loading_switched_off_is_a_403(server, roots):
    engine = server.engine
    on = engine.cfg
    engine.cfg = dataclasses.replace(on, allow_runtime_lora=False)
    try:
        r = load(server, "inside2", str(roots / "beta-copy"))
        assert r.status_code == 403 and "--allow-runtime-lora" in r.json()["error"]["message"]
        r = httpx.post(server.url + "/v1/unload_lora_adapter", headers=auth(), json={"lora_name": "alpha-r4"})
        assert r.status_code == 403
    finally:
        engine.cfg = on
    assert "alpha-r4" in engine.adapters and "inside2" not in engine.adapters
    assert ServeConfig().allow_runtime_lora is False  # the default, as vLLM's


def test_max_completion_tokens_zero_and_lone_surrogates_are_a_400(server):
    def chat(body: dict) -> httpx.Response:
        return httpx.post(server.url + "/v1/chat/completions", headers=auth(), timeout=30,
                          json={"model": "dlora-demo", **body})

    r = chat({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens"
    r = chat({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    raw = b'{"model": "dlora-demo", "prompt": "bad \\ud800 text", "max_tokens": 2}'
    r = httpx.post(server.url + "/v1/completions", headers={**auth(), "content-type": "application/json"},
                   content=raw, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert "lone surrogate" in r.json()["error"]["message"]
    raw = b'{"model": "dlora-demo", "messages": [{"role": "user", "content": "\\udc00"}]}'
    r = httpx.post(server.url + "/v1/chat/completions", headers={**auth(), "content-type": "application/json"},
                   content=raw, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    raw = b'{"model": "no\\ud800such", "prompt": "x"}'  # echoed in the 404: escaped, not a 500
    r = httpx.post(server.url + "/v1/completions", headers={**auth(), "content-type": "application/json"},
                   content=raw, timeout=30)
    assert r.status_code == 404 and "\\ud800" in r.json()["error"]["message"]
    raw = b'{"lora_name": "bad\\ud800", "lora_path": "x"}'
    r = httpx.post(server.url + "/v1/load_lora_adapter", headers={**auth(), "content-type": "application/json"},
                   content=raw, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name"


def test_an_incomplete_utf8_tail_comes_out_as_a_replacement_character():
    codec = TextCodec(ensure_demo())
    ids = codec.encode("ok €")[1:]  # byte-level: "€" is three byte tokens here
    assert codec.decode(ids).endswith("€")
    cut = ids[:-1]  # the completion ended inside the character
    expected = codec.decode(cut)  # what Hugging Face's decode gives (errors="replace")
    assert expected.endswith("\ufffd")
    detok = Detokenizer(codec)
    streamed = "".join(detok.add(t) for t in cut)
    assert "\ufffd" not in streamed  # held back while the next token might complete it
    assert streamed + detok.flush() == expected
    whole = Detokenizer(codec)
    assert "".join(whole.add(t) for t in ids) + whole.flush() == codec.decode(ids)  # completed: no U+FFFD


def test_a_taken_port_fails_in_one_line_before_the_banner():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "dlora.cli", "serve", "--port", str(port)],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "COLUMNS": "200"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "already in use" in out and "dlora serve:" not in out
    assert len([line for line in out.splitlines() if line.strip()]) == 1, out


def test_the_serve_command_reads_vllm_environment_variables(tmp_path):
    from serve_helpers import wait_healthy

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "VLLM_API_KEY": KEY, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true"}
    proc = subprocess.Popen([sys.executable, "-m", "dlora.cli", "serve", "--port", str(port), "--log-level",
                             "warning", "--allowed-adapter-root", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_healthy(url, proc)
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/v1/models", headers=auth()).status_code == 200
        shutil.copytree(demo_adapter_paths(ensure_demo())[0], tmp_path / "mine")
        r = httpx.post(url + "/v1/load_lora_adapter", headers=auth(), timeout=30,
                       json={"lora_name": "mine", "lora_path": str(tmp_path / "mine")})
        assert r.status_code == 200, r.text  # runtime loading on, from under the allowed root
    finally:
        proc.terminate()
        proc.wait(30)
