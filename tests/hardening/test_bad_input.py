"""Bad input, table-driven, against the real engine on the tiny fixture: every row gets its 4xx in OpenAI
shape, with `param` and a message that names the problem, never a 5xx, and the server answers the next
request. (test_app_errors.py covers the same paths against a scripted engine; this is the full stack.)"""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from tests.hardening.conftest import BASE, HI, MAX_BODY, answers, error_of

CHAT, COMP = "/v1/chat/completions", "/v1/completions"


@dataclass
class Row:
    body: dict | bytes
    status: int
    code: str
    param: str | None
    words: tuple[str, ...]  # each appears in the message (case-insensitive)
    path: str = CHAT
    method: str = "POST"


def chat(**fields) -> dict:
    return {"model": BASE, "messages": HI, **fields}


def comp(**fields) -> dict:
    return {"model": BASE, "prompt": "hi", **fields}


def bad(param, *words, body=None, path=CHAT, code="invalid_value", status=400) -> Row:
    return Row(body, status, code, param, words, path)


def raw(text: bytes, *words, path=CHAT) -> Row:
    return Row(text, 400, "invalid_value", None, words or ("JSON",), path)


def missing_model(path):
    return Row({"messages": HI} if path == CHAT else {"prompt": "x"}, 400, "invalid_value", "model",
               ("missing", "model"), path)


NOT_FOUND = ("model_not_found", 404)
ROWS = {
    # malformed JSON
    "json-truncated": raw(b'{"model": '),
    "json-trailing-comma": raw(b'{"model": "tiny", "messages": [],}'),
    "json-single-quotes": raw(b"{'model': 'tiny'}"),
    "json-nan": Row(b'{"model":"tiny","messages":[{"role":"user","content":"hi"}],"temperature":NaN}', 400,
                    "invalid_value", "temperature", ("temperature",)),
    "json-deep-nesting": raw(b'{"model":"tiny","messages":' + b"[" * 5000 + b"]" * 5000 + b"}", "JSON"),
    "json-top-level-array": Row(b"[]", 400, "invalid_value", None, ("object",)),
    "json-top-level-string": Row(b'"hello"', 400, "invalid_value", None, ("object",)),
    "json-empty-body": Row(b"", 400, "invalid_value", "model", ("missing", "model")),
    # wrong types
    "type-model-int": bad("model", "model", body=chat(model=5)),
    "type-messages-string": bad("messages", "messages", body=chat(messages="hi")),
    "type-temperature-string": bad("temperature", "temperature", body=chat(temperature="hot")),
    "type-max-tokens-fraction": bad("max_tokens", "max_tokens", body=chat(max_tokens=1.5)),
    "type-max-tokens-numeric-string": bad("max_tokens", "max_tokens", "integer", body=chat(max_tokens="10")),
    "type-echo-int": bad("echo", "echo", "boolean", body=comp(echo=0), path=COMP),
    "type-n-string": bad("n", "n", body=chat(n="two")),
    "type-stream-int": bad("stream", "stream", body=chat(stream=5)),
    "type-stop-int": bad("stop", "stop", body=chat(stop=5)),
    "type-stop-int-list": bad("stop", "stop", body=chat(stop=[1, 2])),
    "type-content-int": bad("messages[0].content", "content", body=chat(messages=[{"role": "user", "content": 5}])),
    "type-seed-string": bad("seed", "seed", body=chat(seed="abc")),
    "type-stream-options": bad("stream_options", "stream_options", body=chat(stream=True, stream_options="yes")),
    "type-prompt-object": bad("prompt", "prompt", body=comp(prompt={"text": "hi"}), path=COMP),
    # missing fields
    "missing-model-chat": missing_model(CHAT),
    "missing-model-completions": missing_model(COMP),
    "missing-messages": bad("messages", "missing", "messages", body={"model": BASE}),
    "missing-prompt": bad("prompt", "missing", "prompt", body={"model": BASE}, path=COMP),
    "missing-role": bad("messages[0].role", "role", body=chat(messages=[{"content": "hi"}])),
    # out of range
    "temperature-negative": bad("temperature", "temperature", body=chat(temperature=-0.5)),
    "temperature-over-2": bad("temperature", "temperature", body=chat(temperature=2.5)),
    "top-p-zero": bad("top_p", "top_p", body=chat(top_p=0)),
    "top-p-over-1": bad("top_p", "top_p", body=chat(top_p=1.5)),
    "presence-penalty-over": bad("presence_penalty", "presence_penalty", body=chat(presence_penalty=2.5)),
    "frequency-penalty-under": bad("frequency_penalty", "frequency_penalty", body=chat(frequency_penalty=-3)),
    "repetition-penalty-zero": bad("repetition_penalty", "repetition_penalty", body=chat(repetition_penalty=0)),
    "top-k-under": bad("top_k", "top_k", body=chat(top_k=-2)),
    "top-logprobs-over": bad("top_logprobs", "top_logprobs", body=chat(logprobs=True, top_logprobs=21)),
    "top-logprobs-without-logprobs": bad("top_logprobs", "logprobs", body=chat(top_logprobs=2)),
    "completion-logprobs-over": bad("logprobs", "logprobs", body=comp(logprobs=21), path=COMP),
    "seed-over-int64": bad("seed", "seed", body=chat(seed=2**64)),
    # max_tokens
    "max-tokens-zero": bad("max_tokens", "max_tokens", body=chat(max_tokens=0)),
    "max-tokens-negative": bad("max_tokens", "max_tokens", body=chat(max_tokens=-1)),
    "max-completion-tokens-zero": bad("max_completion_tokens", "max_completion_tokens",
                                      body=chat(max_completion_tokens=0)),
    "completion-max-tokens-zero": bad("max_tokens", "max_tokens", body=comp(max_tokens=0), path=COMP),
    "max-tokens-over-context": bad("messages", "maximum context length is 128", body=chat(max_tokens=1000),
                                   code="context_length_exceeded"),
    "max-tokens-huge": bad("messages", "maximum context length", body=chat(max_tokens=2**70),
                           code="context_length_exceeded"),
    # n
    "n-zero": bad("n", "n", body=chat(n=0)),
    "n-over-128": bad("n", "n", body=chat(n=129)),
    "n-over-engine-slots": bad("n", "n", "4", body=chat(n=5)),
    "n-times-models-over": bad("n", "n", body=chat(n=100, models=[BASE, "pre8"])),
    "completion-too-many-prompts": bad("prompt", "prompt", body=comp(prompt=["hi"] * 200), path=COMP),
    # stop strings
    "stop-too-many": bad("stop", "stop", "64", body=chat(stop=[f"s{i}" for i in range(65)])),
    "stop-empty-string": bad("stop", "stop", "empty", body=chat(stop="")),
    "stop-too-long": bad("stop", "stop", "characters", body=chat(stop=["x" * 1000])),
    # messages
    "messages-empty": bad("messages", "messages", body=chat(messages=[])),
    "role-unknown": bad("messages[0].role", "role", body=chat(messages=[{"role": "wizard", "content": "hi"}])),
    "role-only-system": bad("messages", "user", body=chat(messages=[{"role": "system", "content": "be nice"}])),
    "role-last-assistant": bad("messages[1].role", "last message", "user",
                               body=chat(messages=[*HI, {"role": "assistant", "content": "a"}])),
    "role-user-twice": bad("messages[1].role", "assistant", body=chat(messages=[*HI, *HI])),
    "role-tool": bad("messages[0].role", "tool", body=chat(messages=[{"role": "tool", "content": "x"}])),
    "content-blank": bad("messages[0].content", "empty", body=chat(messages=[{"role": "user", "content": "  "}])),
    "content-image-part": bad("messages[0].content[0].type", "image_url",
                              body=chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}])),
    # prompt longer than the context
    "prompt-over-context-chat": bad("messages", "maximum context length is 128",
                                    body=chat(messages=[{"role": "user", "content": "你好" * 300}], max_tokens=1),
                                    code="context_length_exceeded"),
    "prompt-over-context-ids": bad("messages", "maximum context length is 128",
                                   body=comp(prompt=[5] * 200, max_tokens=1), path=COMP,
                                   code="context_length_exceeded"),
    "prompt-id-outside-vocab": bad("prompt", "vocabulary", body=comp(prompt=[999_999]), path=COMP),
    "prompt-negative-id": bad("prompt", "vocabulary", body=comp(prompt=[-1]), path=COMP),
    "prompt-empty-list": bad("prompt", "empty", body=comp(prompt=[]), path=COMP),
    # encodings
    "utf8-invalid-bytes": raw(b'{"model":"tiny","messages":[{"role":"user","content":"\xff\xfe"}]}', "JSON"),
    "utf8-overlong": raw(b'{"model":"tiny","messages":[{"role":"user","content":"\xc0\xaf"}]}', "JSON"),
    "surrogate-lone-lead": raw(b'{"model":"tiny","messages":[{"role":"user","content":"\\ud800"}]}', "JSON"),
    "surrogate-lone-trail": raw(b'{"model":"tiny","prompt":"x\\udc00y"}', "surrogate", path=COMP),
    # huge bodies (the chunked form, without Content-Length, is in test_huge_streamed_body)
    "body-over-limit": Row(chat(messages=[{"role": "user", "content": "x" * (MAX_BODY + 10)}]), 413,
                           "request_too_large", None, ("bytes", "--max-body-bytes")),
    # unknown models and adapter names that try to leave the checkpoints folder
    "model-unknown": bad("model", "`nope`", body=chat(model="nope"), code=NOT_FOUND[0], status=404),
    "model-unknown-stream": bad("model", "does not exist", body=chat(model="nope", stream=True), code=NOT_FOUND[0],
                                status=404),
    "model-unknown-completions": bad("model", "does not exist", body=comp(model="nope"), path=COMP,
                                     code=NOT_FOUND[0], status=404),
    "model-dotdot": bad("model", "../pre8", body=chat(model="../pre8"), code=NOT_FOUND[0], status=404),
    "model-dotdot-inside": bad("model", "does not exist", body=chat(model="pre8/../proj"), code=NOT_FOUND[0],
                               status=404),
    "model-slash": bad("model", "does not exist", body=chat(model="pre8/checkpoint-1"), code=NOT_FOUND[0],
                       status=404),
    "model-absolute": bad("model", "/etc/passwd", body=chat(model="/etc/passwd"), code=NOT_FOUND[0], status=404),
    "model-url-encoded": bad("model", "does not exist", body=chat(model="%2e%2e%2fpre8"), code=NOT_FOUND[0],
                             status=404),
    "model-nul": bad("model", "does not exist", body=chat(model="pre8\x00"), code=NOT_FOUND[0], status=404),
    "fan-out-unknown": bad("models", "does not exist", body=chat(models=[BASE, "../proj"]), code=NOT_FOUND[0],
                           status=404),
    # features we refuse rather than ignore
    "tools": bad("tools", "tools", body=chat(tools=[{"type": "function", "function": {"name": "f"}}])),
    "response-format-json": bad("response_format", "json_object", body=chat(response_format={"type": "json_object"})),
    "stream-options-without-stream": bad("stream_options", "stream", body=chat(stream_options={"include_usage": True})),
    "logit-bias": bad("logit_bias", "logit_bias", body=chat(logit_bias={"5": 1})),
    "echo": bad("echo", "echo", body=comp(echo=True), path=COMP),
}
ROUTE_ROWS = {  # (method, path, status, code, words)
    "route-unknown": ("GET", "/v1/engines", 404, "not_found", ("/v1/engines",)),
    "route-wrong-method": ("GET", CHAT, 405, "method_not_allowed", ("GET",)),
    "retrieve-dotdot-encoded": ("GET", "/v1/models/..%2F..%2Fetc%2Fpasswd", 404, "model_not_found", ("passwd",)),
    "retrieve-absolute-encoded": ("GET", "/v1/models/%2Fetc%2Fpasswd", 404, "model_not_found", ("passwd",)),
    "retrieve-adapter-path": ("GET", "/v1/models/pre8%2F..%2Fproj", 404, "model_not_found", ("does not exist",)),
}
ADMIN_ROWS = {  # admin loads are confined to the checkpoints folder
    "admin-path-dotdot": ({"name": "x", "path": "../pre8"}, "path"),
    "admin-path-absolute": ({"name": "x", "path": "/etc"}, "path"),
    "admin-name-encoded": ({"name": "a%2F..%2Fb"}, "name"),
    "admin-name-backslash": ({"name": "..\\pre8"}, "name"),
    "admin-path-deep": ({"name": "x", "path": "pre8/a/b"}, "path"),
}


def send(http, row: Row):
    if isinstance(row.body, bytes):
        return http.request(row.method, row.path, content=row.body, headers={"content-type": "application/json"})
    return http.request(row.method, row.path, json=row.body)


def test_the_matrix_is_large_enough():
    four_xx = [r for r in ROWS.values() if 400 <= r.status < 500]
    assert len(four_xx) + len(ROUTE_ROWS) + len(ADMIN_ROWS) >= 40


@pytest.mark.parametrize("name", list(ROWS))
def test_bad_request_gets_its_4xx_and_the_server_answers_next(http, name):
    row = ROWS[name]
    err = error_of(send(http, row), row.status)
    assert err["code"] == row.code, err
    assert err["type"] == "invalid_request_error", err
    assert err["param"] == row.param, err
    for word in row.words:
        assert word.lower() in err["message"].lower(), (word, err["message"])
    assert answers(http)


@pytest.mark.parametrize("name", list(ROUTE_ROWS))
def test_bad_routes(http, name):
    method, path, status, code, words = ROUTE_ROWS[name]
    err = error_of(http.request(method, path), status)
    assert err["code"] == code and all(w in err["message"] for w in words), err
    assert answers(http)


@pytest.mark.parametrize("name", list(ADMIN_ROWS))
def test_admin_paths_outside_the_checkpoints_folder(http, hardened, name):
    body, param = ADMIN_ROWS[name]
    err = error_of(http.post("/v1/adapters/load", json=body), 400)
    assert err["param"] == param and "not allowed" in err["message"], err
    ids = {m["id"] for m in http.get("/v1/models").json()["data"]}
    assert "x" not in ids and {"pre8", "proj", BASE} <= ids
    assert answers(http)


def test_extra_fields_are_ignored_not_refused(http):
    r = http.post(CHAT, json=chat(max_tokens=2, x_vendor_extra={"a": 1}, metadata={"k": "v"}, store=False,
                                  service_tier="auto", user="u1"))
    assert r.status_code == 200, r.text
    r = http.post(COMP, json=comp(max_tokens=2, x_vendor_extra=[1, 2]))
    assert r.status_code == 200, r.text


def test_huge_streamed_body_is_413_while_reading(http):
    def chunks():  # no Content-Length: the cap is enforced as the body arrives
        yield b'{"model":"tiny","messages":[{"role":"user","content":"'
        for _ in range(MAX_BODY // 1000 + 5):
            yield b"x" * 1000
        yield b'"}]}'

    r = http.post(CHAT, content=chunks(), headers={"content-type": "application/json"})
    assert error_of(r, 413)["code"] == "request_too_large"
    assert answers(http)
