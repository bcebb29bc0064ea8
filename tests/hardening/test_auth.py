"""Auth with API keys set: every route the app has (enumerated from the app, so a new route is covered the
day it is added) answers 401 in OpenAI shape without a valid key, except /health, the web page and
/metrics (public unless --metrics-auth, see test_app_ops); near-miss keys and other places to put a key
are refused; the comparison touches every configured key through hmac.compare_digest on equal-length
digests; and no key, right or wrong, reaches the log or an error body."""
from __future__ import annotations

import hmac
import logging

import httpx
import pytest
from starlette.routing import Mount, Route

from server import middleware
from server.app import build_app
from server.middleware import KeyChecker
from server.settings import ServerSettings
from tests.hardening.conftest import BASE, HI, KEY, error_of
from tests.server.fake_engine import FakeEngine

PUBLIC = {"/health", "/metrics", "/"}
SAMPLE_PARAMS = {"model_id": "pre8", "path": "index.html"}


def all_routes() -> list[tuple[str, str]]:
    """(method, path) of every route of a fully configured app, path parameters filled in."""
    app = build_app(FakeEngine(), ServerSettings(api_keys=["k"]))
    out = {(m.upper(), path.format(**SAMPLE_PARAMS)) for path, ops in app.openapi()["paths"].items() for m in ops}
    out |= {(m, r.path) for r in app.routes if type(r) is Route for m in r.methods - {"HEAD"}}  # /docs etc.
    out |= {("GET", r.path + "/index.html") for r in app.routes if isinstance(r, Mount)}
    return sorted(out)


ROUTES = all_routes()
GUARDED = [(m, p) for m, p in ROUTES if p not in PUBLIC and not p.startswith("/static")]
NEAR_MISSES = {
    "none": {},
    "wrong": {"Authorization": "Bearer sk-wrong"},
    "prefix": {"Authorization": f"Bearer {KEY[:-1]}"},
    "longer": {"Authorization": f"Bearer {KEY}x"},
    "upper-case": {"Authorization": f"Bearer {KEY.upper()}"},
    "basic-scheme": {"Authorization": f"Basic {KEY}"},
    "no-scheme": {"Authorization": KEY},
    "empty-bearer": {"Authorization": "Bearer"},
    "x-api-key-header": {"x-api-key": KEY},
    "api-key-header": {"api-key": KEY},
}


def test_every_v1_and_admin_route_is_guarded():
    paths = {p for _, p in GUARDED}
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/models/pre8", "/v1/adapters/load",
            "/v1/adapters/reload", "/v1/adapters/unload", "/docs", "/openapi.json"} <= paths
    assert all(p.startswith("/v1/") or p in ("/docs", "/openapi.json", "/docs/oauth2-redirect") for p in paths), paths


@pytest.mark.parametrize("method,path", GUARDED + [("GET", "/v1/no-such-route"), ("POST", "/v1/models"),
                                                   ("GET", "/v1/models/%2E%2E/%2E%2E/health")])
def test_401_without_a_valid_key(hardened, method, path):
    with httpx.Client(base_url=hardened.url) as c:
        for how, headers in NEAR_MISSES.items():
            r = c.request(method, path, headers=headers, json={"model": BASE, "messages": HI})
            err = error_of(r, 401)
            assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error", how
            assert KEY not in r.text and "sk-wrong" not in r.text, how


def test_key_in_the_query_string_is_not_a_key(hardened):
    assert httpx.get(hardened.url + f"/v1/models?api_key={KEY}").status_code == 401
    assert httpx.get(hardened.url + f"/v1/models?key={KEY}").status_code == 401


@pytest.mark.parametrize("method,path", GUARDED)
def test_valid_key_passes_the_gate(http, method, path):
    body = {"model": BASE, "messages": HI, "prompt": "hi", "max_tokens": 1}
    if path.startswith("/v1/adapters/"):
        body = {"name": "pre8"}
    r = http.request(method, path, json=body)
    assert r.status_code < 400 or r.json()["error"]["code"] != "invalid_api_key", r.text
    if path != "/v1/adapters/unload":
        assert r.status_code == 200, r.text
    else:  # unload works, and the adapter loads again on next use
        assert r.status_code == 200 and http.post("/v1/adapters/load", json={"name": "pre8"}).status_code == 200


def test_open_routes_need_no_key(hardened):
    assert httpx.get(hardened.url + "/health").json() == {"status": "ok"}
    assert httpx.get(hardened.url + "/metrics").status_code == 200  # --metrics-auth is off here


def test_comparison_is_constant_time_over_all_keys(monkeypatch):
    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(middleware.hmac, "compare_digest", counting)
    keys = KeyChecker(["first-key", "k2", "a-much-longer-third-key-" * 4])
    for header, ok in ((f"Bearer first-key", True), ("Bearer k2", True), ("Bearer " + "a-much-longer-third-key-" * 4,
                                                                            True), ("Bearer nope", False),
                       ("Bearer " + "x" * 5000, False), (None, False)):
        calls.clear()
        assert keys.check(header) is ok
        assert len(calls) == 3, (header, calls)  # no early exit on a match or a mismatch
        assert {n for pair in calls for n in pair} == {32}  # digests: equal length whatever the key length


def test_keys_never_reach_the_log(hardened, http, caplog):
    with caplog.at_level(logging.DEBUG):
        http.post("/v1/chat/completions", json={"model": BASE, "messages": HI, "max_tokens": 1})
        http.post("/v1/chat/completions", json={"model": "nope", "messages": HI})
        httpx.get(hardened.url + "/v1/models", headers={"Authorization": "Bearer sk-wrong-log-probe"})
        httpx.post(hardened.url + "/v1/adapters/load", headers={"Authorization": f"Basic {KEY}"}, json={"name": "x"})
    assert caplog.records  # the requests were logged
    assert KEY not in caplog.text and "sk-wrong-log-probe" not in caplog.text
