"""Sampling fields through the server (issue 15, defect 4), against transformers' forward of the
demo model: greedy with logit_bias forcing a token, penalties (the greedy sequence a reference
loop over HF logits gives), n > 1 (seeded choices, streamed and not), logprobs (completions and
chat: shape, and equal to log-softmax of the model's logits), echo, top_k / min_p, stop_token_ids,
include_stop_str_in_output, and a 400 naming the field for everything refused or unknown."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch

from dlora.exec.demo import ensure_demo
from dlora.serve import BackgroundServer, ServeConfig, ServingEngine

DEMO = "dlora-demo"
PROMPT = "The quick brown fox"
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def server():
    engine = ServingEngine(ServeConfig(replicas=1))
    engine.codec.chat_template = CHAT_TEMPLATE
    with BackgroundServer(engine) as srv:
        yield srv


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(ensure_demo()), dtype=torch.float32).eval()


def post(server, path: str, **body) -> httpx.Response:
    return httpx.post(server.url + path, timeout=60, json={"model": DEMO, **body})


def complete(server, **body) -> dict:
    r = post(server, "/v1/completions", **{"prompt": PROMPT, "ignore_eos": True, **body})
    assert r.status_code == 200, r.text
    return r.json()


def ref_penalties(x: np.ndarray, prompt: list[int], output: list[int], rep: float, freq: float,
                  pres: float) -> np.ndarray:
    x = x.copy()
    for t in set(prompt) | set(output):
        x[t] = x[t] / rep if x[t] > 0 else x[t] * rep
    for t in set(output):
        x[t] -= output.count(t) * freq + pres
    return x


def hf_greedy(model, prompt_ids: list[int], n: int, rep: float = 1.0, freq: float = 0.0,
              pres: float = 0.0) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens over HF's logits with the penalties applied as the reference defines
    them, and each step's log-softmax of the raw logits."""
    ids, out, logps = list(prompt_ids), [], []
    with torch.no_grad():
        for _ in range(n):
            raw = model(torch.tensor([ids])).logits[0, -1].double().numpy()
            logps.append(raw - np.log(np.exp(raw - raw.max()).sum()) - raw.max())
            token = int(np.argmax(ref_penalties(raw, prompt_ids, out, rep, freq, pres)))
            out.append(token)
            ids.append(token)
    return out, logps


def test_greedy_with_logit_bias_forces_the_token(server):
    codec = server.engine.codec
    r = complete(server, max_tokens=4, temperature=0, logit_bias={"77": 100}, logprobs=0)
    assert r["choices"][0]["text"] == codec.decode([77] * 4)
    assert r["choices"][0]["logprobs"]["tokens"] == [codec.decode([77], skip_special_tokens=False)] * 4


def test_penalties_give_the_reference_greedy_sequence(server, hf_model):
    codec = server.engine.codec
    prompt_ids = codec.encode(PROMPT)
    for rep, freq, pres in [(1.0, 0.0, 0.0), (1.8, 0.0, 0.0), (1.0, 0.6, 0.0), (1.0, 0.0, 1.5),
                            (1.3, 0.4, 0.8)]:
        want, _ = hf_greedy(hf_model, prompt_ids, 12, rep, freq, pres)
        r = complete(server, max_tokens=12, temperature=0, repetition_penalty=rep,
                     frequency_penalty=freq, presence_penalty=pres)
        assert r["choices"][0]["text"] == codec.decode(want), (rep, freq, pres)


def test_completion_logprobs_are_log_softmax_of_the_model_logits(server, hf_model):
    codec = server.engine.codec
    want, logps = hf_greedy(hf_model, codec.encode(PROMPT), 5)
    r = complete(server, max_tokens=5, temperature=0, logprobs=3)
    lp = r["choices"][0]["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 5
    assert lp["tokens"] == [codec.decode([t], skip_special_tokens=False) for t in want]
    np.testing.assert_allclose(lp["token_logprobs"], [logps[k][t] for k, t in enumerate(want)], atol=1e-4)
    for k, top in enumerate(lp["top_logprobs"]):
        best = np.argsort(-logps[k])[:3]
        assert set(top) == {codec.decode([int(t)], skip_special_tokens=False) for t in best}
        np.testing.assert_allclose(sorted(top.values(), reverse=True), logps[k][best], atol=1e-4)
    assert lp["text_offset"] == list(np.cumsum([0] + [len(t) for t in lp["tokens"][:-1]]))


def test_chat_logprobs_and_top_logprobs(server):
    r = post(server, "/v1/chat/completions", messages=[{"role": "user", "content": "hi"}],
             max_tokens=4, temperature=0, ignore_eos=True, logprobs=True, top_logprobs=2)
    assert r.status_code == 200, r.text
    body = r.json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"] == 4
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][1]["logprob"]
        assert entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"])  # greedy
        assert entry["bytes"] == list(entry["token"].encode("utf-8"))
    r = post(server, "/v1/chat/completions", messages=[{"role": "user", "content": "hi"}],
             max_tokens=2, logprobs=False)
    assert r.status_code == 200 and r.json()["choices"][0]["logprobs"] is None


def test_streamed_logprobs_cover_every_token(server):
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60, json={
            "model": DEMO, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "logprobs": 1, "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    tokens = [t for e in events for t in ((e["choices"][0]["logprobs"] or {}).get("tokens") or [])]
    whole = complete(server, max_tokens=6, temperature=0, logprobs=1)["choices"][0]["logprobs"]
    assert tokens == whole["tokens"]


def test_n_gives_n_seeded_choices_streamed_or_not(server):
    body = {"max_tokens": 6, "temperature": 1.0, "seed": 7, "n": 3}
    r = complete(server, **body)
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    assert r["usage"]["completion_tokens"] == 18 and r["usage"]["prompt_tokens"] > 0
    texts = [c["text"] for c in r["choices"]]
    assert len(set(texts)) > 1  # choice i draws with seed + i
    assert [c["text"] for c in complete(server, **body)["choices"]] == texts
    one = complete(server, **{**body, "n": 1, "seed": 8})
    assert one["choices"][0]["text"] == texts[1]
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60, json={
            "model": DEMO, "prompt": PROMPT, "ignore_eos": True, "stream": True, **body}) as s:
        lines = [line for line in s.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    streamed = ["", "", ""]
    finishes = {}
    for line in lines[:-1]:
        c = json.loads(line[6:])["choices"][0]
        streamed[c["index"]] += c["text"]
        if c["finish_reason"]:
            finishes[c["index"]] = c["finish_reason"]
    assert streamed == texts and finishes == {0: "length", 1: "length", 2: "length"}
    chat = post(server, "/v1/chat/completions", messages=[{"role": "user", "content": "hi"}],
                max_tokens=3, n=2, ignore_eos=True).json()
    assert len(chat["choices"]) == 2 and chat["usage"]["completion_tokens"] == 6


def test_echo_returns_the_prompt(server):
    plain = complete(server, max_tokens=4, temperature=0)["choices"][0]["text"]
    echoed = complete(server, max_tokens=4, temperature=0, echo=True)["choices"][0]["text"]
    assert echoed == PROMPT + plain
    ids = server.engine.codec.encode("Hello")
    r = complete(server, prompt=ids, max_tokens=2, temperature=0, echo=True)
    assert r["choices"][0]["text"].startswith("Hello")
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60, json={
            "model": DEMO, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
            "echo": True, "stream": True}) as s:
        first = next(json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {"))
    assert first["choices"][0]["text"] == PROMPT
    msgs = [{"role": "user", "content": "tell"}, {"role": "assistant", "content": "Once upon"}]
    r = post(server, "/v1/chat/completions", messages=msgs, max_tokens=3, echo=True,
             add_generation_prompt=False, continue_final_message=True, ignore_eos=True)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].startswith("Once upon")


def test_top_k_1_and_min_p_1_sample_as_greedy(server):
    greedy = complete(server, max_tokens=8, temperature=0)["choices"][0]["text"]
    assert complete(server, max_tokens=8, temperature=1.5, top_k=1, seed=3)["choices"][0]["text"] == greedy
    assert complete(server, max_tokens=8, temperature=1.5, min_p=1.0, seed=3)["choices"][0]["text"] == greedy
    assert complete(server, max_tokens=8, temperature=1.0, top_k=-1, seed=3)["choices"][0]["text"]


def test_stop_token_ids_and_include_stop_str(server):
    r = complete(server, max_tokens=6, temperature=0, logit_bias={"77": 100}, stop_token_ids=[77])
    assert r["choices"][0]["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == 1
    text = complete(server, max_tokens=8, temperature=0)["choices"][0]["text"]
    stop = text[2:4]
    cut = complete(server, max_tokens=8, temperature=0, stop=[stop])["choices"][0]
    kept = complete(server, max_tokens=8, temperature=0, stop=[stop], include_stop_str_in_output=True)["choices"][0]
    assert cut["finish_reason"] == kept["finish_reason"] == "stop"
    assert kept["text"] == cut["text"] + stop and stop not in cut["text"]


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {"prompt": "x", "frobnicate": 1}, "frobnicate"),
    ("/v1/completions", {"prompt": "x", "min_tokens": 2}, "min_tokens"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix"),
    ("/v1/completions", {"prompt": "x", "best_of": 2}, "best_of"),
    ("/v1/completions", {"prompt": "x", "guided_json": {"type": "object"}}, "guided_json"),
    ("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 1}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "top_k": -2}, "top_k"),
    ("/v1/completions", {"prompt": "x", "min_p": 1.5}, "min_p"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"x": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"-1": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {"prompt": "x", "priority": 1}, "priority"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tool_choice": "auto"}, "tool_choice"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "store": True}, "store"),
])
def test_refused_and_unknown_fields_are_a_400_naming_the_field(server, path, body, param):
    r = post(server, path, **body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and param in r.json()["error"]["message"]


def test_accepted_neutral_fields(server):
    r = post(server, "/v1/chat/completions", messages=[{"role": "user", "content": "x", "name": "bob"}],
             max_tokens=2, response_format={"type": "text"}, user="u", tool_choice="none",
             parallel_tool_calls=False, spaces_between_special_tokens=True, request_id="abc",
             length_penalty=1.0, include_reasoning=True, skip_special_tokens=False,
             truncate_prompt_tokens=3)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 3
