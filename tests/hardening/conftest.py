"""One real engine on the THUDM tiny fixture behind the real app (uvicorn in a thread, 127.0.0.1), shared by
the hardening tests: an API key, small limits (max_model_len 128, 4 running + 4 waiting), and a checkpoints
folder of its own that the adapter-fault tests damage."""
from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from server.app import build_app
from server.settings import ServerSettings
from tests.server.fake_engine import serve

KEY = "sk-hardening-7f3a9c"
BASE = "tiny"
HI = [{"role": "user", "content": "hi"}]
LIMITS = dict(max_model_len=128, max_num_seqs=4, max_waiting=4)
MAX_BODY = 64 * 1024


@dataclass
class Hardened:
    url: str
    engine: object
    checkpoints: Path
    fixture: Path

    def client(self, key: str | None = KEY, timeout: float = 60) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)


@pytest.fixture(scope="session")
def hardened(fixture_dir, tmp_path_factory):
    from server.engine import AsyncEngine

    root = tmp_path_factory.mktemp("hardening-checkpoints")
    shutil.copytree(fixture_dir / "ptuning-pre8", root / "pre8")
    shutil.copytree(fixture_dir / "ptuning-pre8-proj", root / "proj")
    engine = AsyncEngine.from_paths(fixture_dir / "model", base_model_id=BASE, checkpoints_dir=root, **LIMITS)
    settings = ServerSettings(model=fixture_dir / "model", model_name=BASE, api_keys=[KEY], checkpoints=root,
                              max_body_bytes=MAX_BODY, drain_timeout=5)
    with serve(build_app(engine, settings)) as srv:
        yield Hardened(srv.url, engine, root, fixture_dir)


@pytest.fixture
def http(hardened):
    with hardened.client() as c:
        yield c


def error_of(r: httpx.Response, status: int) -> dict:
    """The OpenAI error body of `r`, after checking its status, content type and shape."""
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def metric(http: httpx.Client, name: str) -> float:
    text = http.get("/metrics").text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def wait_idle(http: httpx.Client, seconds: float = 20) -> float:
    """chatglm_num_requests_running once it is 0 (or whatever it is after `seconds`)."""
    deadline = time.monotonic() + seconds
    while (running := metric(http, "chatglm_num_requests_running")) and time.monotonic() < deadline:
        time.sleep(0.05)
    return running


def answers(http: httpx.Client, model: str = BASE) -> bool:
    """The server still serves: a one-token chat completes."""
    r = http.post("/v1/chat/completions", json={"model": model, "messages": HI, "max_tokens": 1})
    return r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
