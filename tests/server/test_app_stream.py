"""Wire behaviour of chat and completions over a real socket (FakeEngine behind build_app):
openai SDK with strict response validation plus raw httpx for byte-exact SSE (contract §2.9 1-11, 17-20)."""
import time

import httpx
import openai
import pytest

from server.app import build_app
from server.settings import ServerSettings
from tests.server.fake_engine import FakeEngine, serve, sse_payloads

HI = [{"role": "user", "content": "你好"}]


@pytest.fixture(scope="module")
def live():
    engine = FakeEngine(token_delay=0.001)
    with serve(build_app(engine, ServerSettings())) as srv:
        srv.engine = engine
        yield srv


@pytest.fixture(scope="module")
def http(live):
    with httpx.Client(base_url=live.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def sdk(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, _strict_response_validation=True)


def stream(http, path="/v1/chat/completions", **body) -> tuple[httpx.Response, list[dict]]:
    with http.stream("POST", path, json={"stream": True, **body}) as r:
        raw = r.read().decode()
    assert r.status_code == 200, raw
    assert r.headers["content-type"].startswith("text/event-stream")
    return r, sse_payloads(raw)


def test_models_list_and_retrieve(sdk, live):
    ids = [m.id for m in sdk.models.list().data]
    assert ids[0] == "fake-base" and set(ids) == {m.id for m in live.engine.models()}
    for m in sdk.models.list().data:
        assert m.object == "model" and isinstance(m.created, int) and m.owned_by
    card = sdk.models.retrieve("team/ad-c")  # a name with "/"
    assert card.id == "team/ad-c" and card.model_extra["parent"] == "fake-base"
    assert card.model_extra["pre_seq_len"] == 4 and card.model_extra["state"] == "loaded"
    assert card.model_extra["version"] == "v1"
    broken = sdk.models.retrieve("broken")
    assert broken.model_extra["state"] == "failed" and "boom" in broken.model_extra["error"]


def test_non_stream_chat_shape(sdk):
    raw = sdk.chat.completions.with_raw_response.create(model="ad-a", messages=HI, temperature=0)
    assert raw.headers["x-request-id"] and raw.headers["content-type"] == "application/json"
    r = raw.parse()
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and abs(r.created - time.time()) <= 5
    assert r.model == "ad-a" and r.system_fingerprint == "fp_ad-a_v1"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.completion_tokens > 0


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_one(sdk, field):
    r = sdk.chat.completions.create(model="fake-base", messages=HI, temperature=0, **{field: 1})
    assert r.usage.completion_tokens == 1 and r.choices[0].finish_reason == "length"


def test_stream_framing_and_invariants(http, live):
    whole = http.post("/v1/chat/completions", json={"model": "ad-b", "messages": HI, "temperature": 0}).json()
    r, chunks = stream(http, model="ad-b", messages=HI, temperature=0)
    assert r.headers["x-request-id"]
    assert len({(c["id"], c["created"], c["model"], c["object"]) for c in chunks}) == 1
    assert chunks[0]["object"] == "chat.completion.chunk" and chunks[0]["model"] == "ad-b"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    assert sum(c["choices"][0]["finish_reason"] is not None for c in chunks) == 1
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all("usage" not in c for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"] and "\ufffd" not in text


def test_usage_chunk(http):
    _, chunks = stream(http, model="fake-base", messages=HI, temperature=0, stream_options={"include_usage": True})
    assert chunks[-1]["choices"] == [] and all(c["usage"] is None for c in chunks[:-1])
    usage = chunks[-1]["usage"]
    n_tokens = sum(1 for c in chunks[1:-1] if c["choices"][0]["delta"].get("content"))
    assert usage["completion_tokens"] >= n_tokens > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.parametrize("stop", ["STOP-HERE", ["zzz", "STOP-HERE"]])
def test_stop_string_split_over_tokens(http, stop):
    body = {"model": "fake-base", "messages": [{"role": "user", "content": "STOPME"}], "temperature": 0, "stop": stop}
    whole = http.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert whole["finish_reason"] == "stop" and "STOP" not in whole["message"]["content"]
    _, chunks = stream(http, **body)
    deltas = [c["choices"][0]["delta"].get("content", "") for c in chunks]
    assert all("ST" not in d for d in deltas)  # no fragment of the stop string leaks
    assert "".join(deltas) == whole["message"]["content"]


def test_trimmed_like_process_response(http):
    body = {"model": "fake-base", "messages": [{"role": "user", "content": "TRIM"}], "temperature": 0}
    content = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    assert content == content.strip() and "2023年" in content and "[[" not in content
    _, chunks = stream(http, **body)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == content


def test_n_choices_stream_and_not(sdk, http):
    r = sdk.chat.completions.create(model="fake-base", messages=HI, n=2, seed=7, temperature=1)
    assert [c.index for c in r.choices] == [0, 1]
    _, chunks = stream(http, model="fake-base", messages=HI, n=2, seed=7, temperature=1)
    for i in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert sum(c["finish_reason"] is not None for c in mine) == 1
        assert "".join(c["delta"].get("content", "") for c in mine) == r.choices[i].message.content


def test_seed_reproduces_and_fingerprint_follows_reload(sdk, http, live):
    a = sdk.chat.completions.create(model="ad-a", messages=HI, seed=123, temperature=0.9)
    b = sdk.chat.completions.create(model="ad-a", messages=HI, seed=123, temperature=0.9)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.system_fingerprint == b.system_fingerprint == "fp_ad-a_v1"
    assert live.engine.calls[-1].params.seed == 123
    import asyncio
    asyncio.run(live.engine.reload_adapter("ad-a"))
    c = sdk.chat.completions.create(model="ad-a", messages=HI, seed=123, temperature=0.9)
    assert c.system_fingerprint == "fp_ad-a_v2"


def test_temperature_zero_is_greedy_and_fields_reach_the_engine(sdk, live):
    sdk.chat.completions.create(model="fake-base", messages=HI, temperature=0, top_p=0.5, stop=["x"],
                                presence_penalty=1, frequency_penalty=0.5, max_completion_tokens=5,
                                extra_body={"top_k": 3, "repetition_penalty": 1.1, "ignore_eos": True})
    p = live.engine.calls[-1].params
    assert p.greedy and (p.top_p, p.top_k, p.stop, p.max_tokens) == (0.5, 3, ["x"], 5)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.ignore_eos) == (1, 0.5, 1.1, True)


def test_chat_logprobs(sdk):
    r = sdk.chat.completions.create(model="fake-base", messages=HI, logprobs=True, top_logprobs=2, max_tokens=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 3
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 and t.bytes == list(t.token.encode()) for t in content)


def test_sdk_stream_with_strict_validation(sdk):
    got = list(sdk.chat.completions.create(model="ad-b", messages=HI, stream=True, temperature=0,
                                           stream_options={"include_usage": True}))
    assert got[0].choices[0].delta.role == "assistant" and got[-1].usage.completion_tokens > 0
    text = "".join(c.choices[0].delta.content or "" for c in got if c.choices)
    whole = sdk.chat.completions.create(model="ad-b", messages=HI, temperature=0)
    assert text == whole.choices[0].message.content


def test_completions(sdk, http, live):
    r = sdk.completions.create(model="fake-base", prompt="Hello")
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert live.engine.calls[-1].params.max_tokens == 16  # OpenAI's default
    assert live.engine.calls[-1].params.temperature == 1.0
    r = sdk.completions.create(model="fake-base", prompt=["a", "b"], n=2, max_tokens=3, logprobs=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == 3 and len(lp.top_logprobs[0]) == 2
    assert r.usage.prompt_tokens == 2 * 3  # two prompts of [gMASK] sop + one character, counted once each
    _, chunks = stream(http, "/v1/completions", model="fake-base", prompt="Hello", temperature=0)
    assert all(c["object"] == "text_completion" for c in chunks)
    assert sum(c["choices"][0]["finish_reason"] is not None for c in chunks) == 1
    whole = http.post("/v1/completions", json={"model": "fake-base", "prompt": "Hello", "temperature": 0}).json()
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    r = sdk.completions.create(model="fake-base", prompt=[11, 12, 13], max_tokens=2)
    assert live.engine.calls[-1].targets[0].prompt_ids == [11, 12, 13]


def test_fan_out_across_adapters(sdk, live):
    r = sdk.chat.completions.create(model="fake-base", messages=HI, temperature=0,
                                    extra_body={"models": ["ad-a", "ad-b", "fake-base"]})
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.model_extra["model"] for c in r.choices] == ["ad-a", "ad-b", "fake-base"]
    targets = live.engine.calls[-1].targets
    assert [t.model for t in targets] == ["ad-a", "ad-b", "fake-base"]
    tok = live.engine.tokenizer
    assert tok.decode(targets[1].prompt_ids).startswith("PFX:[Round 1]")  # ad-b's source_prefix
    assert r.usage.prompt_tokens == sum(len(t.prompt_ids) for t in targets)
    solo = sdk.chat.completions.create(model="ad-b", messages=HI, temperature=0)
    assert r.choices[1].message.content == solo.choices[0].message.content
    assert r.system_fingerprint.startswith("fp_") and r.system_fingerprint != solo.system_fingerprint


def test_parts_content_and_unknown_fields(sdk, live):
    r = sdk.chat.completions.create(
        model="fake-base", temperature=0,
        messages=[{"role": "system", "content": [{"type": "text", "text": "S."}]},
                  {"role": "user", "content": [{"type": "text", "text": "Q"}]}],
        extra_body={"some_vendor_option": {"x": 1}}, user="me", metadata={"k": "v"})
    assert r.choices[0].message.content
    assert live.engine.tokenizer.decode(live.engine.calls[-1].targets[0].prompt_ids) == "[Round 1]\n\n问：S.Q\n\n答："


def test_concurrent_streams_over_mixed_adapters(live):
    import concurrent.futures as cf
    models = ["fake-base", "ad-a", "ad-b", "team/ad-c"]

    def one(i):
        with httpx.Client(base_url=live.url, timeout=30) as c:
            return stream(c, model=models[i % 4], messages=HI, temperature=0)[1]

    with cf.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    for i, chunks in enumerate(results):
        assert chunks[0]["model"] == models[i % 4]
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert live.engine.stats().num_running == 0
