"""Operations: API keys, adapter admin confinement, metrics, request ids, disconnects, drain, static page."""
import logging
import os
import time

import httpx
import openai
import pytest

from server.app import ServerState, build_app
from server.http_errors import ShuttingDown
from server.middleware import KeyChecker, RequestIdFilter
from server.settings import ServerSettings
from tests.server.fake_engine import FakeEngine, serve, sse_payloads

HI = [{"role": "user", "content": "hi"}]
KEY = "sk-test-1"


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    (root / "new-one").mkdir()
    (root / "exp" / "checkpoint-10").mkdir(parents=True)
    outside = tmp_path_factory.mktemp("outside")
    os.symlink(outside, root / "sneaky")
    static = tmp_path_factory.mktemp("static")
    (static / "index.html").write_text("<h1>chat</h1>")
    engine = FakeEngine(token_delay=0.001)
    settings = ServerSettings(api_keys=[KEY, "sk-test-2"], checkpoints=root, static_dir=static, max_metric_models=3)
    with serve(build_app(engine, settings)) as srv:
        srv.engine = engine
        yield srv


def auth(key=KEY):
    return {"Authorization": f"Bearer {key}"}


def test_key_checker():
    k = KeyChecker(["a", "bb"])
    assert k.check("Bearer a") and k.check("bearer bb") and not k.check("Bearer b") and not k.check(None)
    assert not k.check("Basic a") and not k.check("a") and not KeyChecker([]).enabled


def test_api_keys_guard_v1_only(secured):
    url = secured.url
    for path in ("/v1/models", "/v1/models/fake-base"):
        r = httpx.get(url + path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + path, headers=auth("wrong")).status_code == 401
        assert httpx.get(url + path, headers=auth()).status_code == 200
        assert httpx.get(url + path, headers=auth("sk-test-2")).status_code == 200
    r = httpx.post(url + "/v1/chat/completions", json={"model": "fake-base", "messages": HI})
    assert r.status_code == 401
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/metrics").status_code == 200  # public unless --metrics-auth
    assert httpx.get(url + "/").text == "<h1>chat</h1>"  # the web page is public
    assert httpx.get(url + "/docs").status_code == 401  # deny by default
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
    assert e.value.body["code"] == "invalid_api_key"
    sdk = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, _strict_response_validation=True)
    assert sdk.chat.completions.create(model="ad-a", messages=HI).choices[0].message.content


def test_metrics_auth_option():
    with serve(build_app(FakeEngine(), ServerSettings(api_keys=[KEY], metrics_auth=True))) as srv:
        assert httpx.get(srv.url + "/metrics").status_code == 401
        assert httpx.get(srv.url + "/metrics", headers=auth()).status_code == 200


def test_admin_disabled_without_keys():
    with serve(build_app(FakeEngine(), ServerSettings())) as srv:
        r = httpx.post(srv.url + "/v1/adapters/load", json={"name": "x"})
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"


def test_admin_load_reload_unload(secured):
    url, h = secured.url, auth()
    assert httpx.post(url + "/v1/adapters/load", json={"name": "new-one"}).status_code == 401
    r = httpx.post(url + "/v1/adapters/load", json={"name": "new-one"}, headers=h)
    assert r.status_code == 200 and r.json()["id"] == "new-one" and r.json()["parent"] == "fake-base"
    assert any(m["id"] == "new-one" for m in httpx.get(url + "/v1/models", headers=h).json()["data"])
    r = httpx.post(url + "/v1/adapters/load", json={"name": "exp/checkpoint-10"}, headers=h)
    assert r.status_code == 200
    r = httpx.post(url + "/v1/adapters/load", json={"name": "alias", "path": "exp/checkpoint-10"}, headers=h)
    assert r.status_code == 200
    assert secured.engine.resolve("alias").path.endswith("exp/checkpoint-10")
    r = httpx.post(url + "/v1/adapters/reload", json={"name": "new-one"}, headers=h)
    assert r.json()["version"] == "v2"
    r = httpx.post(url + "/v1/adapters/unload", json={"name": "new-one"}, headers=h)
    assert r.json() == {"id": "new-one", "object": "model", "deleted": True}
    assert httpx.get(url + "/v1/models/new-one", headers=h).status_code == 404


@pytest.mark.parametrize("body", [
    {"name": "../etc"}, {"name": "a/../../b"}, {"name": "/etc/passwd"}, {"name": "%2e%2e"}, {"name": "a\\b"},
    {"name": "a/b"}, {"name": ".hidden"}, {"name": "x", "path": "../outside"}, {"name": "x", "path": "/tmp"},
    {"name": "x", "path": "exp/../.."}, {"name": "x", "path": "%2e%2e%2fetc"}, {"name": "x", "path": "sneaky"},
    {"name": "ok..name"},
])
def test_admin_paths_are_confined(secured, body):
    r = httpx.post(secured.url + "/v1/adapters/load", json=body, headers=auth())
    assert r.status_code == 400 and r.json()["error"]["param"] in ("name", "path"), r.text


def test_admin_missing_folder_and_bad_body(secured):
    r = httpx.post(secured.url + "/v1/adapters/load", json={"name": "absent"}, headers=auth())
    assert r.status_code == 404
    r = httpx.post(secured.url + "/v1/adapters/load", json={"nom": "x"}, headers=auth())
    assert r.status_code == 400


def test_metrics_per_adapter_with_cardinality_cap(secured):
    sdk = openai.OpenAI(base_url=secured.url + "/v1", api_key=KEY, max_retries=0)
    for model in ("ad-a", "ad-b", "team/ad-c", "fake-base"):
        sdk.chat.completions.create(model=model, messages=HI)
    text = httpx.get(secured.url + "/metrics").text
    assert 'chatglm_requests_total{endpoint="chat",model="fake-base",outcome="success"}' in text
    assert 'chatglm_time_to_first_token_seconds_count{model="ad-a"}' in text
    assert 'model="other"' in text  # cap of 3 distinct adapters: the 4th and later share "other"
    assert "chatglm_num_requests_running 0.0" in text
    assert 'chatglm_http_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert 'chatglm_engine_model_stat{model="fake-base",stat="requests"} 1.0' in text
    assert KEY not in text


def test_request_id_header_and_log_context(secured, caplog):
    caplog.handler.addFilter(RequestIdFilter())
    with caplog.at_level(logging.INFO, logger="server.requests"):
        r = httpx.post(secured.url + "/v1/chat/completions", json={"model": "fake-base", "messages": HI},
                       headers={**auth(), "X-Request-Id": "trace-42"})
    assert r.headers["x-request-id"] == "trace-42"
    assert [rec.request_id for rec in caplog.records if rec.name == "server.requests"] == ["trace-42"]
    assert all(KEY not in rec.getMessage() for rec in caplog.records)
    r = httpx.get(secured.url + "/health", headers={"X-Request-Id": "bad id <script>"})
    assert len(r.headers["x-request-id"]) == 32 and "<" not in r.headers["x-request-id"]


def wait_idle(engine, seconds=5.0):
    deadline = time.monotonic() + seconds
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.02)
    return engine.stats().num_running


def test_disconnect_mid_stream_aborts(secured):
    body = {"model": "ad-a", "messages": [{"role": "user", "content": "SLOW"}], "stream": True}
    for _ in range(3):
        with httpx.stream("POST", secured.url + "/v1/chat/completions", json=body, headers=auth(), timeout=30) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]  # three events (data line + blank line each)
            assert got[0].startswith("data: ")
        assert wait_idle(secured.engine) == 0
    text = httpx.get(secured.url + "/metrics").text
    assert 'outcome="client_gone"' in text


def test_disconnect_non_stream_aborts(secured):
    body = {"model": "ad-a", "messages": [{"role": "user", "content": "SLOW"}]}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(secured.url + "/v1/chat/completions", json=body, headers=auth(), timeout=0.5)
    assert wait_idle(secured.engine) == 0


def test_drain_lets_streams_finish():
    engine = FakeEngine(token_delay=0.15)
    with serve(build_app(engine, ServerSettings()), timeout_graceful_shutdown=10) as srv:
        with httpx.stream("POST", srv.url + "/v1/chat/completions", timeout=30,
                          json={"model": "fake-base", "messages": HI, "stream": True}) as r:
            lines = r.iter_lines()
            first = next(lines)
            srv.server.should_exit = True  # SIGTERM-equivalent while the answer is still streaming
            raw = first + "\n" + "\n".join(lines) + "\n"
        chunks = sse_payloads(raw)
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        srv.thread.join(timeout=15)
        assert engine._draining and not engine.running  # lifespan shut the engine down


def test_state_refuses_while_draining():
    state = ServerState(FakeEngine(), ServerSettings())
    state.started = True
    state.draining = True
    with pytest.raises(ShuttingDown):
        state.check_ready()
