"""Conformance of `python -m server` on the chatglm2-tiny fixture (base + both P-Tuning v2 checkpoints):
the openai SDK with strict response validation and raw httpx against a real subprocess, checklist §2.9,
and greedy chat answers equal to THUDM's `model.chat` strings recorded in the fixture."""
import concurrent.futures as cf
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import REPO_ROOT
from tests.server.fake_engine import sse_payloads

KEY = "sk-conformance"
ADAPTERS = ("ptuning-pre8", "ptuning-pre8-proj")
BASE = "chatglm2-tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(fixture_dir, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [sys.executable, "-m", "server", "--model", str(fixture_dir / "model"), "--model-name", BASE,
           "--port", str(port), "--torch-threads", "1", "--api-key", KEY, "--drain-timeout", "5",
           "--checkpoints", str(tmp_path_factory.mktemp("checkpoints"))]
    for name in ADAPTERS:
        cmd += ["--adapter", f"{name}={fixture_dir / name}"]
    broken = tmp_path_factory.mktemp("broken")
    (broken / "config.json").write_text('{"pre_seq_len": 8}')  # no prefix weights: must be refused, not fatal
    cmd += ["--adapter", f"broken={broken}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, log_path.read_text()
        try:
            if httpx.get(url + "/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.2)
    yield type("Server", (), {"url": url, "proc": proc, "log": log_path})
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def sdk(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, _strict_response_validation=True)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


def conversation(record: dict) -> list[dict]:
    messages = []
    for q, a in record.get("history", []):
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return messages + [{"role": "user", "content": record["query"]}]


def chunks_of(http, path="/v1/chat/completions", **body) -> list[dict]:
    with http.stream("POST", path, json={"stream": True, **body}) as r:
        raw = r.read().decode()
    assert r.status_code == 200, raw
    return sse_payloads(raw)


def content_of(chunks: list[dict]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def test_startup_log(server):
    text = server.log.read_text()
    assert "listening on http://127.0.0.1:" in text and "quantization none" in text
    assert f"base model {BASE} ready" in text
    for name in ADAPTERS:
        assert re.search(rf"adapter {name} loaded \(pre_seq_len=8", text), text
    assert re.search(r"WARNING server \[-\] adapter broken refused: .*not a P-Tuning v2 checkpoint", text), text
    assert KEY not in text


def test_models_list_and_retrieve(sdk):
    models = {m.id: m for m in sdk.models.list().data}
    assert set(models) == {BASE, *ADAPTERS, "broken"}
    assert models["broken"].model_extra["state"] == "failed" and models["broken"].model_extra["error"]
    for name, projection in zip(ADAPTERS, (False, True)):
        card = sdk.models.retrieve(name)
        extra = card.model_extra
        assert card.id == name and extra["parent"] == BASE and extra["pre_seq_len"] == 8
        assert extra["prefix_projection"] is projection and extra["state"] == "loaded" and extra["version"]
    assert sdk.models.retrieve(BASE).model_extra["kind"] == "base"
    with pytest.raises(openai.NotFoundError) as e:
        sdk.models.retrieve("no-such-adapter")
    assert e.value.body["code"] == "model_not_found"


@pytest.mark.parametrize("model", [BASE, *ADAPTERS])
@pytest.mark.parametrize("record_name", ["chat", "chat_no_history"])
def test_greedy_chat_equals_thudm_chat(sdk, http, expected, model, record_name):
    record = (expected["base"] if model == BASE else expected["ptuning"][model])[record_name]
    messages = conversation(record)
    r = sdk.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=20)
    assert r.choices[0].message.content == record["response"]
    assert r.model == model and r.usage.completion_tokens <= 20
    chunks = chunks_of(http, model=model, messages=messages, temperature=0, max_tokens=20)
    assert content_of(chunks) == record["response"]


def test_stream_invariants_and_usage_chunk(http):
    messages = [{"role": "user", "content": "你好"}]
    chunks = chunks_of(http, model=ADAPTERS[1], messages=messages, temperature=0, max_tokens=12,
                       stream_options={"include_usage": True})
    assert len({(c["id"], c["created"], c["model"]) for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]) == 1
    assert chunks[-1]["choices"] == [] and all(c["usage"] is None for c in chunks[:-1])
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == 12 and usage["total_tokens"] == usage["prompt_tokens"] + 12
    assert len({c["system_fingerprint"] for c in chunks}) == 1


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_one(sdk, field):
    r = sdk.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "你好"}], **{field: 1})
    assert r.usage.completion_tokens == 1 and r.choices[0].finish_reason == "length"


def test_stop_strings_spanning_tokens(sdk, http, expected):
    record = expected["base"]["chat_no_history"]
    answer = record["response"]
    stop = answer[10:16]  # several tokens of the greedy answer
    messages = conversation(record)
    for value in (stop, ["@@never@@", stop]):
        r = sdk.chat.completions.create(model=BASE, messages=messages, temperature=0, max_tokens=20, stop=value)
        assert r.choices[0].finish_reason == "stop"
        assert r.choices[0].message.content == answer[:10].strip()
        chunks = chunks_of(http, model=BASE, messages=messages, temperature=0, max_tokens=20, stop=value)
        deltas = [c["choices"][0]["delta"].get("content") or "" for c in chunks]
        assert stop not in "".join(deltas) and "".join(deltas) == answer[:10].strip()


def test_n_and_seed(sdk, http):
    messages = [{"role": "user", "content": "讲个故事"}]
    a = sdk.chat.completions.create(model=ADAPTERS[0], messages=messages, n=2, seed=11, temperature=0.9, max_tokens=16)
    b = sdk.chat.completions.create(model=ADAPTERS[0], messages=messages, n=2, seed=11, temperature=0.9, max_tokens=16)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.system_fingerprint == b.system_fingerprint and a.system_fingerprint
    chunks = chunks_of(http, model=ADAPTERS[0], messages=messages, n=2, seed=11, temperature=0.9, max_tokens=16)
    for i in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == i]
        assert "".join(c["delta"].get("content") or "" for c in mine) == a.choices[i].message.content


def test_logprobs(sdk):
    r = sdk.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "你好"}], temperature=0,
                                    max_tokens=5, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
        assert abs(t.logprob - t.top_logprobs[0].logprob) < 1e-4  # greedy picks the best token
    c = sdk.completions.create(model=BASE, prompt="Hello, my name is", max_tokens=4, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4


def test_completions_match_greedy_generate(sdk, http, expected):
    run = expected["base"]["generate"]["en_continuation"]["sequences"][0]
    r = sdk.completions.create(model=BASE, prompt=run["prompt"], max_tokens=20, temperature=0)
    assert r.choices[0].text == run["new_text"] and r.usage.prompt_tokens == len(run["input_ids"])
    r = sdk.completions.create(model=BASE, prompt=run["input_ids"], max_tokens=20, temperature=0)
    assert r.choices[0].text == run["new_text"]
    chunks = chunks_of(http, "/v1/completions", model=BASE, prompt=run["prompt"], max_tokens=20, temperature=0)
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == run["new_text"]
    default = sdk.completions.create(model=BASE, prompt=[run["prompt"], "你好"])
    assert len(default.choices) == 2 and all(c.finish_reason in ("stop", "length") for c in default.choices)
    assert default.usage.completion_tokens <= 32  # max_tokens defaults to 16 per choice


def test_fan_out_matches_single_adapter_answers(sdk, expected):
    record = expected["base"]["chat_no_history"]
    r = sdk.chat.completions.create(model=BASE, messages=conversation(record), temperature=0, max_tokens=20,
                                    extra_body={"models": [BASE, *ADAPTERS]})
    answers = [expected["base"]["chat_no_history"]["response"],
               *(expected["ptuning"][a]["chat_no_history"]["response"] for a in ADAPTERS)]
    assert [c.message.content for c in r.choices] == answers
    assert [c.model_extra["model"] for c in r.choices] == [BASE, *ADAPTERS]


def test_error_paths(server, http):
    def err(r, status):
        assert r.status_code == status, r.text
        return r.json()["error"]

    hi = [{"role": "user", "content": "hi"}]
    assert err(httpx.post(server.url + "/v1/chat/completions", json={"model": BASE, "messages": hi}), 401)[
        "code"] == "invalid_api_key"
    for stream in (False, True):
        r = http.post("/v1/chat/completions", json={"model": "nope", "messages": hi, "stream": stream})
        assert err(r, 404)["code"] == "model_not_found"
        r = http.post("/v1/chat/completions", json={"model": BASE, "messages": hi, "max_tokens": 100_000,
                                                    "stream": stream})
        assert err(r, 400)["code"] == "context_length_exceeded"
    for body, param in (({"temperature": 3}, "temperature"), ({"n": 0}, "n"), ({"messages": []}, "messages"),
                        ({"tools": [{"type": "function"}]}, "tools")):
        assert err(http.post("/v1/chat/completions", json={"model": BASE, "messages": hi, **body}), 400)[
            "param"] == param
    r = http.post("/v1/chat/completions", json={"model": "broken", "messages": hi})
    assert err(r, 503)["code"] == "adapter_failed" and r.headers["x-should-retry"] == "false"
    assert http.get("/health").json() == {"status": "ok"}
    assert http.post("/v1/chat/completions", json={"model": BASE, "messages": hi, "max_tokens": 2,
                                                   "x_unknown": 1}).status_code == 200


def running(http) -> float:
    text = http.get("/metrics").text
    return float(re.search(r"^chatglm_num_requests_running (\S+)$", text, re.M).group(1))


def test_32_concurrent_streams_over_mixed_adapters(server, http):
    models = [BASE, *ADAPTERS]
    record = {"query": "你好"}
    solo = {m: content_of(chunks_of(http, model=m, messages=conversation(record), temperature=0, max_tokens=20))
            for m in models}

    def one(i):
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=300) as c:
            return chunks_of(c, model=models[i % 3], messages=conversation(record), temperature=0, max_tokens=20)

    with cf.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    for i, chunks in enumerate(results):
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        assert content_of(chunks) == solo[models[i % 3]]  # batched with other adapters = alone
    assert running(http) == 0


def test_disconnects_leave_no_running_sequences(server, http):
    body = {"model": ADAPTERS[0], "messages": [{"role": "user", "content": "你好"}], "stream": True,
            "max_tokens": 1500, "ignore_eos": True}

    def one(i):
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
            with c.stream("POST", "/v1/chat/completions", json={**body, "model": (BASE, *ADAPTERS)[i % 3]}) as r:
                lines = r.iter_lines()
                return [next(lines) for _ in range(6)][0]  # three events, then hang up

    with cf.ThreadPoolExecutor(10) as pool:
        assert all(first.startswith("data: ") for first in pool.map(one, range(10)))
    deadline = time.monotonic() + 10
    while running(http) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running(http) == 0
    assert 'outcome="client_gone"' in http.get("/metrics").text


def test_sigterm_drains_and_exits_cleanly(server, http):
    body = {"model": BASE, "messages": [{"role": "user", "content": "你好"}], "stream": True, "max_tokens": 60}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        first = next(lines)
        server.proc.send_signal(signal.SIGTERM)
        raw = first + "\n" + "\n".join(lines) + "\n"
    chunks = sse_payloads(raw)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert server.proc.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
    log = Path(server.log).read_text()
    assert "draining" in log and "engine stopped" in log and "Traceback" not in log
