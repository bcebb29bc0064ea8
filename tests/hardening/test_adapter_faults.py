"""Adapter faults on the live server (real engine, its checkpoints folder on disk): a truncated or corrupt
pytorch_model.bin, a wrong-shape prefix, a folder deleted while serving, a checkpoint written while the
server rescans. Each is refused (503 adapter_failed, not to be retried) or served at its last good
version; the reason is in /v1/models and in the log; the base and the other adapters keep answering with
unchanged fingerprints. (Registry-level cases are in tests/server/test_adapters.py.)"""
from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from server.adapter_files import discover
from tests.hardening.conftest import BASE, HI, answers, error_of

CHAT = "/v1/chat/completions"


def card(http, name: str) -> dict:
    cards = {c["id"]: c for c in http.get("/v1/models").json()["data"]}
    return cards[name]


def fingerprints(http) -> dict[str, str]:
    out = {}
    for name in (BASE, "pre8", "proj"):
        r = http.post(CHAT, json={"model": name, "messages": HI, "max_tokens": 1})
        assert r.status_code == 200, r.text
        out[name] = r.json()["system_fingerprint"]
    return out


def refused(http, name: str, *words: str) -> None:
    """Both the first request (which tries the load) and the next one are a final 503 with the reason."""
    for _ in range(2):
        r = http.post(CHAT, json={"model": name, "messages": HI, "max_tokens": 1})
        err = error_of(r, 503)
        assert err["code"] == "adapter_failed" and r.headers["x-should-retry"] == "false", err
        assert all(w in err["message"] for w in words), err
    c = card(http, name)
    assert c["state"] == "failed" and all(w in c["error"] for w in words), c


def write_slowly(path: Path, data: bytes, pieces: int, pause: float = 0.05) -> None:
    with open(path, "ab") as f:
        for i in range(pieces):
            f.write(data[i * len(data) // 8:(i + 1) * len(data) // 8])
            f.flush()
            time.sleep(pause)


@pytest.fixture
def others(http):
    """The base and the healthy adapters' fingerprints before a fault; checked unchanged after it."""
    before = fingerprints(http)
    yield
    assert fingerprints(http) == before


def test_truncated_and_corrupt_weights_are_refused_with_the_reason(hardened, http, others, caplog):
    src = hardened.fixture / "ptuning-pre8"
    for name, damage in (("truncated", lambda b: b[:len(b) // 2]), ("corrupt", lambda b: bytes(len(b)))):
        shutil.copytree(src, hardened.checkpoints / name)
        weights = hardened.checkpoints / name / "pytorch_model.bin"
        weights.write_bytes(damage(weights.read_bytes()))
        with caplog.at_level(logging.WARNING):
            refused(http, name, "cannot read", "pytorch_model.bin")
        assert f"adapter {name} refused: cannot read" in caplog.text


def test_wrong_shape_prefix_is_refused(hardened, http, others, caplog):
    folder = hardened.checkpoints / "wrong-shape"
    shutil.copytree(hardened.fixture / "ptuning-pre8", folder)
    sd = torch.load(folder / "pytorch_model.bin", weights_only=True)
    key = next(iter(sd))
    sd[key] = torch.zeros(sd[key].shape[0], sd[key].shape[1] + 3)  # kv width that fits no layer layout
    torch.save(sd, folder / "pytorch_model.bin")
    with caplog.at_level(logging.WARNING):
        refused(http, "wrong-shape")
    assert "adapter wrong-shape refused" in caplog.text and card(http, "wrong-shape")["error"] in caplog.text


def test_folder_deleted_while_serving_keeps_the_last_good_version(hardened, http, others, caplog):
    folder = hardened.checkpoints / "doomed"
    shutil.copytree(hardened.fixture / "ptuning-pre8", folder)
    first = http.post(CHAT, json={"model": "doomed", "messages": HI, "max_tokens": 1}).json()
    version = card(http, "doomed")["version"]
    body = {"model": "doomed", "messages": HI, "max_tokens": 60, "ignore_eos": True, "stream": True}
    with http.stream("POST", CHAT, json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        shutil.rmtree(folder)  # mid-stream
        rest = "\n".join(lines)
    assert rest.rstrip().endswith("data: [DONE]") and '"finish_reason":"length"' in rest
    with caplog.at_level(logging.WARNING):
        again = http.post(CHAT, json={"model": "doomed", "messages": HI, "max_tokens": 1})
    assert again.status_code == 200 and again.json()["system_fingerprint"] == first["system_fingerprint"]
    c = card(http, "doomed")
    assert c["state"] == "loaded" and c["version"] == version
    assert f"still serving version {version}" in c["error"] and "not a P-Tuning v2 checkpoint folder" in c["error"]
    assert f"adapter doomed: reload failed, still serving version {version}" in caplog.text


def test_checkpoint_written_while_the_server_rescans(hardened, http, others, caplog):
    run = hardened.checkpoints / "run"
    shutil.copytree(hardened.fixture / "ptuning-pre8", run / "checkpoint-1")
    assert http.post(CHAT, json={"model": "run", "messages": HI, "max_tokens": 1}).status_code == 200
    good = card(http, "run")["version"]
    sd = torch.load(run / "checkpoint-1" / "pytorch_model.bin", weights_only=True)
    newer = {k: v * 1.5 for k, v in sd.items()}
    staged = run / "checkpoint-2"
    staged.mkdir()
    buf = run / "weights.tmp"
    torch.save(newer, buf)
    data = buf.read_bytes()
    buf.unlink()
    writer = threading.Thread(target=write_slowly, args=(staged / "pytorch_model.bin", data, 7))
    # the trainer's own protocol: a half-written folder under .staging is never listed
    shutil.copytree(run / "checkpoint-1", run / ".staging" / "checkpoint-3")
    (run / ".staging" / "checkpoint-3" / "pytorch_model.bin").write_bytes(data[:100])
    assert set(discover(run)) == {"checkpoint-1"}  # --checkpoints at the run itself: no .staging, no empty dir
    writer.start()
    seen = set()
    with caplog.at_level(logging.WARNING):
        while writer.is_alive():  # rescans (listing, requests) while 7/8 of the weights are written piece by piece
            ids = {c["id"] for c in http.get("/v1/models").json()["data"]}
            assert not any(".staging" in i or "checkpoint-3" in i for i in ids), ids
            r = http.post(CHAT, json={"model": "run", "messages": HI, "max_tokens": 1})
            assert r.status_code == 200, r.text  # the last good version answers throughout
            seen.add(card(http, "run")["version"])
        writer.join()
    assert seen == {good}, seen
    assert "adapter run: reload failed, still serving version" in caplog.text
    with open(staged / "pytorch_model.bin", "ab") as f:  # the writer finishes
        f.write(data[7 * len(data) // 8:])
    shutil.copy(run / "checkpoint-1" / "config.json", staged / "config.json")
    assert http.post(CHAT, json={"model": "run", "messages": HI, "max_tokens": 1}).status_code == 200
    c = card(http, "run")
    assert c["state"] == "loaded" and c["version"] not in ("", good) and "error" not in c, c
    assert card(http, "run/checkpoint-2")["version"] in ("", c["version"])
    assert http.post(CHAT, json={"model": "run/checkpoint-1", "messages": HI, "max_tokens": 1}).status_code == 200
    assert answers(http, "run/checkpoint-2")
