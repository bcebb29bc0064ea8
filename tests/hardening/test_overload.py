"""Overload on the real engine (4 running + a queue of 4): a burst of 24 long requests, streaming and not.
Every answer is a 200 that finishes or a 429 in OpenAI shape with Retry-After (JSON even for a stream),
nothing hangs, the queue never holds more than its bound, the engine returns to idle, and the openai SDK's
own retry gets a request through once capacity frees."""
from __future__ import annotations

import json
import threading
import time

import httpx
import openai

from tests.hardening.conftest import BASE, HI, KEY, LIMITS, answers, error_of, metric, wait_idle

LONG = {"messages": HI, "max_tokens": 50, "ignore_eos": True}


def one(hardened, i: int, start: threading.Barrier, results: list) -> None:
    body = {**LONG, "model": (BASE, "pre8", "proj")[i % 3], "stream": i % 2 == 0}
    with hardened.client(timeout=120) as c:
        start.wait()
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            r.read()
        results[i] = (body["stream"], r)


def watch(hardened, stop: threading.Event, seen: dict) -> None:
    with hardened.client() as c:
        while not stop.is_set():
            seen["waiting"] = max(seen["waiting"], metric(c, "chatglm_num_requests_waiting"))
            seen["running"] = max(seen["running"], metric(c, "chatglm_num_requests_running"))
            time.sleep(0.02)


def test_burst_gets_429_with_retry_after_and_admitted_requests_finish(hardened, http):
    n = 24
    results: list = [None] * n
    start = threading.Barrier(n)
    seen = {"waiting": 0.0, "running": 0.0}
    stop = threading.Event()
    watcher = threading.Thread(target=watch, args=(hardened, stop, seen))
    watcher.start()
    threads = [threading.Thread(target=one, args=(hardened, i, start, results)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    stop.set()
    watcher.join()
    assert not any(t.is_alive() for t in threads), "a request hung"

    ok = rejected = 0
    for stream, r in results:
        if r.status_code == 429:
            rejected += 1
            err = error_of(r, 429)
            assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded"
            assert "max_waiting" in err["message"]
            assert int(r.headers["retry-after"]) >= 1
            continue
        assert r.status_code == 200, r.text
        ok += 1
        if stream:
            events = [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            finishes = [c["finish_reason"] for e in events[:-1] for c in json.loads(e)["choices"]]
            assert [f for f in finishes if f] == ["length"]
        else:
            assert r.json()["choices"][0]["finish_reason"] == "length"
            assert r.json()["usage"]["completion_tokens"] == LONG["max_tokens"]
    assert ok >= LIMITS["max_num_seqs"] and rejected >= 8, (ok, rejected)
    assert seen["waiting"] <= LIMITS["max_waiting"] and seen["running"] <= LIMITS["max_num_seqs"], seen
    assert wait_idle(http) == 0 and metric(http, "chatglm_num_requests_waiting") == 0
    assert answers(http)


def test_sdk_retries_after_429_until_capacity_frees(hardened, http):
    stop = threading.Event()

    def flood(i: int) -> None:  # closed loop: keeps the engine and its queue full until `stop`
        with hardened.client(timeout=120) as c:
            while not stop.is_set():
                r = c.post("/v1/chat/completions", json={**LONG, "model": (BASE, "pre8", "proj")[i % 3]})
                assert r.status_code in (200, 429), r.text

    threads = [threading.Thread(target=flood, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while True:  # saturated: a small request is refused
        r = http.post("/v1/chat/completions", json={"model": BASE, "messages": HI, "max_tokens": 1})
        if r.status_code == 429:
            break
        assert r.status_code == 200 and time.monotonic() < deadline, r.text
    threading.Timer(1.0, stop.set).start()  # then the flood stops sending, and capacity frees
    statuses: list[int] = []
    client = httpx.Client(event_hooks={"response": [lambda r: statuses.append(r.status_code)]}, timeout=60)
    sdk = openai.OpenAI(base_url=hardened.url + "/v1", api_key=KEY, max_retries=8, http_client=client)
    reply = sdk.chat.completions.create(model="proj", messages=HI, max_tokens=2)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert statuses[0] == 429 and statuses[-1] == 200, statuses  # refused first, then let in by its own retry
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert wait_idle(http) == 0
