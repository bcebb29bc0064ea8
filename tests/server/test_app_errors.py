"""Every error path of contract §2.9: status, OpenAI error shape, param, Retry-After, in-stream errors."""
import threading
import time

import httpx
import openai
import pytest

from server.app import build_app
from server.settings import ServerSettings
from tests.server.fake_engine import FakeEngine, serve, sse_payloads

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def live():
    engine = FakeEngine(token_delay=0.001, max_model_len=64)
    with serve(build_app(engine, ServerSettings(max_body_bytes=20_000))) as srv:
        srv.engine = engine
        yield srv


@pytest.fixture(scope="module")
def http(live):
    with httpx.Client(base_url=live.url, timeout=30) as c:
        yield c


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize("stream", [False, True])
def test_unknown_model_is_404_without_sse(http, stream):
    err = error_of(http.post("/v1/chat/completions", json={"model": "nope", "messages": HI, "stream": stream}), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model" and "`nope`" in err["message"]
    err = error_of(http.post("/v1/completions", json={"model": "nope", "prompt": "x", "stream": stream}), 404)
    assert err["code"] == "model_not_found"


def test_sdk_not_found(live):
    sdk = openai.OpenAI(base_url=live.url + "/v1", api_key="k", max_retries=0, _strict_response_validation=True)
    with pytest.raises(openai.NotFoundError) as e:
        sdk.models.retrieve("nope")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="nope", messages=HI, stream=True)
    with pytest.raises(openai.BadRequestError) as e:
        sdk.chat.completions.create(model="fake-base", messages=HI, temperature=3)
    assert e.value.body["param"] == "temperature"


@pytest.mark.parametrize("body,param", [
    ({"temperature": 3}, "temperature"),
    ({"top_p": 2}, "top_p"),
    ({"n": 0}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "messages[0].role"),
    ({"stop": 5}, "stop"),
    ({"model": 5}, "model"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
    ({"logit_bias": {"1": 2}}, "logit_bias"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_validation_matrix_is_400_with_param(http, body, param):
    r = http.post("/v1/chat/completions", json={"model": "fake-base", "messages": HI, **body})
    err = error_of(r, 400)
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    assert "detail" not in r.text


def test_bad_json_and_wrong_content_type(http):
    err = error_of(http.post("/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"}),
                   400)
    assert "JSON" in err["message"]
    r = http.post("/v1/chat/completions", content=b'{"model":"fake-base","messages":[{"role":"user","content":"x"}]}',
                  headers={"content-type": "application/x-www-form-urlencoded"})  # curl -d without -H
    assert r.status_code == 200


def test_context_length_is_400_json_even_when_streaming(http):
    for stream in (False, True):
        r = http.post("/v1/chat/completions", json={"model": "fake-base", "messages": HI, "max_tokens": 60,
                                                    "stream": stream})
        err = error_of(r, 400)
        assert err["code"] == "context_length_exceeded" and "maximum context length is 64" in err["message"]


def test_failed_adapter_is_503_not_retried(http):
    r = http.post("/v1/chat/completions", json={"model": "broken", "messages": HI})
    err = error_of(r, 503)
    assert err["code"] == "adapter_failed" and "boom" in err["message"]
    assert r.headers["x-should-retry"] == "false"


def test_mid_stream_failure_is_one_error_event_then_done(http, live):
    body = {"model": "fake-base", "messages": [{"role": "user", "content": "FAIL"}], "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        raw = r.read().decode()
    assert r.status_code == 200
    payloads = sse_payloads(raw)
    assert payloads[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "error" in payloads[-1] and sum("error" in p for p in payloads) == 1
    assert payloads[-1]["error"]["type"] == "server_error" and payloads[-1]["error"]["code"] == "engine_dead"
    sdk = openai.OpenAI(base_url=live.url + "/v1", api_key="k", max_retries=0)
    with pytest.raises(openai.APIError):
        for _ in sdk.chat.completions.create(model="fake-base", messages=body["messages"], stream=True):
            pass
    r = http.post("/v1/chat/completions", json={**body, "stream": False})
    assert error_of(r, 500)["code"] == "engine_dead"


def test_overload_is_429_with_retry_after_and_sdk_retry_succeeds(http, live):
    live.engine.max_running = 0
    try:
        r = http.post("/v1/chat/completions", json={"model": "fake-base", "messages": HI})
        err = error_of(r, 429)
        assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded"
        assert r.headers["retry-after"] == "2"
        threading.Timer(0.5, lambda: setattr(live.engine, "max_running", 1000)).start()
        sdk = openai.OpenAI(base_url=live.url + "/v1", api_key="k", max_retries=2)
        t0 = time.monotonic()
        assert sdk.chat.completions.create(model="fake-base", messages=HI).choices[0].message.content
        assert time.monotonic() - t0 >= 1.5  # it waited as Retry-After asked
    finally:
        live.engine.max_running = 1000


def test_unknown_route_and_method(http):
    err = error_of(http.get("/v1/nothing"), 404)
    assert err["code"] == "not_found"
    err = error_of(http.get("/v1/chat/completions"), 405)
    assert err["code"] == "method_not_allowed"


def test_body_too_large_is_413(http):
    big = {"model": "fake-base", "messages": [{"role": "user", "content": "x" * 30_000}]}
    assert error_of(http.post("/v1/chat/completions", json=big), 413)["code"] == "request_too_large"

    def chunks():  # no Content-Length: counted while reading
        yield b'{"model":"fake-base","messages":[{"role":"user","content":"'
        for _ in range(30):
            yield b"x" * 1000
        yield b'"}]}'
    r = http.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert error_of(r, 413)["code"] == "request_too_large"


def test_loading_is_503_with_retry_after():
    engine = FakeEngine(start_delay=1.0)
    with serve(build_app(engine, ServerSettings()), wait_ready=False) as srv:
        r = httpx.get(srv.url + "/health")
        assert error_of(r, 503)["code"] == "engine_not_ready" and r.headers["retry-after"]
        r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "fake-base", "messages": HI})
        assert error_of(r, 503)["code"] == "engine_not_ready"
        deadline = time.monotonic() + 10
        while httpx.get(srv.url + "/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert httpx.get(srv.url + "/health").json() == {"status": "ok"}
