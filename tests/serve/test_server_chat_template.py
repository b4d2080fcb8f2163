"""Chat templates (issue 15, defect 2): prompts token-identical to transformers 5's
`apply_chat_template(..., add_generation_prompt=True)` for a template in `chat_template.jinja`,
one in `tokenizer_config.json` using `{{ bos_token }}` (no second BOS), a list of named
templates, and a Mistral-style template that calls `raise_exception` (a 400 with its message
through the server); no template at all refuses chat with a 400 naming --chat-template;
`--chat-template` as a file or inline; continue_final_message and chat_template_kwargs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from dlora.exec.demo import ensure_demo
from dlora.serve import BackgroundServer, ServeConfig, ServingEngine
from dlora.serve.chat_template import ChatTemplateError, load_chat_template
from dlora.serve.text import TextCodec

CHATML = """{%- for message in messages %}
    {%- if loop.first and message['role'] != 'system' %}
        {{- '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}
    {%- endif %}
    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

BOS_TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}"
                "{{ eos_token if m['role'] == 'assistant' else '' }}\n{% endfor %}"
                "{% if add_generation_prompt %}[ASSISTANT]{% endif %}")

# Mistral's template (v0.1 shape): roles must alternate user/assistant/user/...
MISTRAL = """{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"""

# the extras transformers' sandbox has: tojson (no HTML escaping), namespace, loop controls,
# {% generation %}, strftime_now, and a variable passed through chat_template_kwargs
EXTRAS = """{%- set ns = namespace(n=0) -%}
{%- for m in messages -%}
{%- if m.role == 'skip' %}{% continue %}{% endif -%}
{%- set ns.n = ns.n + 1 -%}
<{{ m.role }}>{{ m | tojson }}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% endif %}
{% endfor -%}
count={{ ns.n }} year={{ strftime_now('%Y') }} mood={{ mood | default('none') }}
{%- if add_generation_prompt %}<assistant>{% endif -%}
"""

CONVERSATION = [
    {"role": "system", "content": "Be brief & <polite>."},
    {"role": "user", "content": "  What is the capital of France?  "},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Spain? \u00e9\u4e2d"},
]
ALTERNATING = CONVERSATION[1:]


def model_copy(tmp_path: Path, name: str, *, jinja: str | None = None,
               config_template: str | list | None = None) -> Path:
    folder = tmp_path / name
    # the demo's own chat_template.jinja is left out: each test brings its template
    shutil.copytree(ensure_demo(), folder, ignore=shutil.ignore_patterns("adapters", "chat_template.jinja"))
    if jinja is not None:
        (folder / "chat_template.jinja").write_text(jinja)
    if config_template is not None:
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        cfg["chat_template"] = config_template
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


def hf_ids(folder: Path, messages: list[dict], **kwargs) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    out = tok.apply_chat_template(messages, tokenize=True, **{"add_generation_prompt": True, **kwargs})
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def hf_text(folder: Path, messages: list[dict], **kwargs) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    return tok.apply_chat_template(messages, tokenize=False, **{"add_generation_prompt": True, **kwargs})


def ours(folder: Path, messages: list[dict], **kwargs) -> list[int]:
    codec = TextCodec(folder)
    return codec.encode(codec.render_chat(messages, **kwargs), add_special_tokens=False)


def test_a_chat_template_jinja_file_renders_token_identical_to_transformers(tmp_path):
    folder = model_copy(tmp_path, "chatml", jinja=CHATML, config_template="{{ 'not this one' }}")
    for messages in (CONVERSATION, ALTERNATING, CONVERSATION[:1]):
        assert ours(folder, messages) == hf_ids(folder, messages)
    assert TextCodec(folder).render_chat(CONVERSATION) == hf_text(folder, CONVERSATION)


def test_a_tokenizer_config_template_with_bos_token_gets_one_bos(tmp_path):
    folder = model_copy(tmp_path, "bos", config_template=BOS_TEMPLATE)
    ids = ours(folder, CONVERSATION)
    assert ids == hf_ids(folder, CONVERSATION)
    assert ids[0] == 1 and ids.count(1) == 1  # the template's BOS, no second one from the tokenizer


def test_named_templates_in_tokenizer_config_use_the_default(tmp_path):
    folder = model_copy(tmp_path, "named", config_template=[
        {"name": "default", "template": BOS_TEMPLATE}, {"name": "tool_use", "template": "{{ 'tools' }}"}])
    assert ours(folder, CONVERSATION) == hf_ids(folder, CONVERSATION)
    folder = model_copy(tmp_path, "no-default", config_template=[{"name": "tool_use", "template": "x"}])
    with pytest.raises(ChatTemplateError, match="default"):
        ours(folder, CONVERSATION)


def test_transformers_extras_match(tmp_path):
    folder = model_copy(tmp_path, "extras", jinja=EXTRAS)
    messages = [*CONVERSATION[:3], {"role": "skip", "content": "x"}, CONVERSATION[3]]
    assert ours(folder, messages) == hf_ids(folder, messages)
    assert ours(folder, messages, variables={"mood": "calm"}) == hf_ids(folder, messages, mood="calm")
    assert "\u4e2d" in TextCodec(folder).render_chat(messages)  # tojson keeps non-ASCII


def test_continue_final_message_matches_transformers(tmp_path):
    folder = model_copy(tmp_path, "cont", jinja=CHATML)
    messages = [*ALTERNATING, {"role": "assistant", "content": "Madrid, of"}]
    kw = {"add_generation_prompt": False, "continue_final_message": True}
    assert ours(folder, messages, **kw) == hf_ids(folder, messages, **kw)
    with pytest.raises(ChatTemplateError, match="not compatible"):
        ours(folder, messages, continue_final_message=True)


def test_the_mistral_template_raises_and_otherwise_matches(tmp_path):
    folder = model_copy(tmp_path, "mistral", config_template=MISTRAL)
    assert ours(folder, ALTERNATING) == hf_ids(folder, ALTERNATING)
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate"):
        ours(folder, CONVERSATION)


@pytest.fixture(scope="module")
def mistral_server(tmp_path_factory):
    folder = model_copy(tmp_path_factory.mktemp("mistral-serve"), "mistral", config_template=MISTRAL)
    engine = ServingEngine(ServeConfig(model=str(folder), replicas=1))
    with BackgroundServer(engine) as srv:
        yield srv, folder


def chat(url: str, **body) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=60,
                      json={"model": "mistral", "max_tokens": 2, "temperature": 0, **body})


def test_the_server_refuses_bad_alternation_with_the_templates_message(mistral_server):
    srv, folder = mistral_server
    r = chat(srv.url, messages=CONVERSATION)
    assert r.status_code == 400
    assert "Conversation roles must alternate" in r.json()["error"]["message"]
    r = chat(srv.url, messages=ALTERNATING)
    assert r.status_code == 200
    assert r.json()["usage"]["prompt_tokens"] == len(hf_ids(folder, ALTERNATING))
    assert httpx.get(srv.url + "/health").status_code == 200


def test_request_fields_of_chat_templates(mistral_server):
    srv, _ = mistral_server
    r = chat(srv.url, messages=ALTERNATING, add_generation_prompt=True, continue_final_message=True)
    assert r.status_code == 400 and r.json()["error"]["param"] == "continue_final_message"
    r = chat(srv.url, messages=ALTERNATING, chat_template="{{ 'mine' }}")
    assert r.status_code == 400 and "trust" in r.json()["error"]["message"]
    r = chat(srv.url, messages=ALTERNATING, chat_template_kwargs={"unused": 1})
    assert r.status_code == 200
    r = chat(srv.url, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content"


def test_without_a_template_chat_is_refused_and_completions_work(mistral_server):
    srv, _ = mistral_server
    engine = srv.engine
    saved, engine.codec.chat_template = engine.codec.chat_template, None
    try:
        r = chat(srv.url, messages=ALTERNATING)
        assert r.status_code == 400 and "--chat-template" in r.json()["error"]["message"]
        r = httpx.post(srv.url + "/v1/completions", timeout=60,
                       json={"model": "mistral", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200
    finally:
        engine.codec.chat_template = saved


def test_load_chat_template_is_a_file_or_the_template_itself(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text(CHATML)
    assert load_chat_template(str(path)) == CHATML
    assert load_chat_template("{{ messages }}") == "{{ messages }}"
    with pytest.raises(ValueError, match="looks like a file path"):
        load_chat_template(str(tmp_path / "missing.jinja"))


def test_the_serve_command_takes_chat_template(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dlora.cli", "serve", "--chat-template", str(tmp_path / "nope.jinja")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "looks like a file path" in r.stderr


def test_the_demo_model_has_a_chat_template_as_transformers_reads_it():
    folder = ensure_demo()
    assert (folder / "chat_template.jinja").is_file()
    assert ours(folder, ALTERNATING) == hf_ids(folder, ALTERNATING)
