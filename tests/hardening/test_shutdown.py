"""SIGTERM on `python -m server` (a real subprocess on the tiny fixture): new requests are refused at once,
an in-flight stream that fits the drain timeout finishes normally, one that does not is ended cleanly (an
error event, then [DONE]) within the timeout, a waiting non-stream request gets a JSON answer, the process
exits 0, and neither the API key nor a wrong key sent by a client appears anywhere in the debug log."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.conftest import REPO_ROOT
from tests.live_server import free_port, wait_healthy

KEY = "sk-shutdown-5d1e0b77"
WRONG = "sk-wrong-c0ffee42aa"
DRAIN = 2.0
HI = [{"role": "user", "content": "你好"}]


def read_stream(client: httpx.Client, body: dict, seen_first: threading.Event, out: dict) -> None:
    try:
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            out["status"] = r.status_code
            events = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[len("data: "):])
                    seen_first.set()
            out["events"] = events
    except httpx.HTTPError as e:
        out["error"] = repr(e)
    finally:
        out["ended"] = time.monotonic()
        seen_first.set()


def post(client: httpx.Client, body: dict, out: dict) -> None:
    try:
        r = client.post("/v1/chat/completions", json=body)
        out["status"], out["body"] = r.status_code, r.json()
    except httpx.HTTPError as e:
        out["error"] = repr(e)


@pytest.fixture
def server(fixture_dir, tmp_path):
    port, log = free_port(), tmp_path / "server.log"
    cmd = [sys.executable, "-m", "server", "--model", str(fixture_dir / "model"), "--model-name", "tiny",
           "--port", str(port), "--torch-threads", "1", "--api-key", KEY, "--drain-timeout", str(DRAIN),
           "--log-level", "debug", "--checkpoints", str(tmp_path), "--adapter",
           f"pre8={fixture_dir / 'ptuning-pre8'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, log)
        yield proc, url, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_drains_refuses_new_work_and_exits_0(server):
    proc, url, log = server
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {WRONG}"}).status_code == 401
    short = {"model": "pre8", "messages": HI, "max_tokens": 40, "temperature": 0}
    long = {"model": "tiny", "messages": HI, "max_tokens": 1800, "ignore_eos": True}
    results = {"short": {}, "long": {}, "blocking": {}}
    clients = [httpx.Client(base_url=url, headers=auth, timeout=60) for _ in range(3)]
    firsts = [threading.Event(), threading.Event()]
    threads = [threading.Thread(target=read_stream, args=(clients[0], long, firsts[0], results["long"])),
               threading.Thread(target=read_stream, args=(clients[1], short, firsts[1], results["short"]))]
    for t in threads:
        t.start()
    assert all(e.wait(60) for e in firsts)
    blocking = threading.Thread(target=post, args=(clients[2], long, results["blocking"]))
    blocking.start()
    time.sleep(0.3)  # the non-stream request is in the engine too

    proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    while "draining" not in log.read_text():
        assert time.monotonic() - signalled < 5, log.read_text()[-2000:]
        time.sleep(0.02)
    try:  # the listening socket is closed (or, on a kept-alive connection, a 503): no new work
        r = httpx.post(url + "/v1/chat/completions", headers=auth, json=short, timeout=5)
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutting_down", r.text
    except httpx.ConnectError:
        pass

    for t in (*threads, blocking):
        t.join(timeout=DRAIN + 30)
    assert proc.wait(timeout=DRAIN + 30) == 0
    for c in clients:
        c.close()

    s = results["short"]  # fits the drain timeout: finished normally
    assert s["status"] == 200 and s["events"][-1] == "[DONE]", s
    finishes = [c["finish_reason"] for e in s["events"][:-1] for c in json.loads(e)["choices"]]
    assert [f for f in finishes if f] in (["stop"], ["length"]), s
    lg = results["long"]  # does not fit: ended cleanly, in-stream, within the drain timeout
    assert lg["status"] == 200 and lg["events"][-1] == "[DONE]", lg
    last = json.loads(lg["events"][-2])
    assert last["error"]["code"] == "server_shutting_down", last
    assert lg["ended"] - signalled < DRAIN + 5
    b = results["blocking"]
    assert b.get("status") == 503 and b["body"]["error"]["code"] == "server_shutting_down", b

    text = log.read_text()
    assert KEY not in text and WRONG not in text
    assert "Traceback" not in text and "engine stopped" in text
