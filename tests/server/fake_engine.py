"""A scripted EngineClient for HTTP-layer tests, plus a uvicorn-in-a-thread harness.

The fake decodes prompts with a character tokenizer and answers with a deterministic script: greedy
answers depend only on (model, prompt); sampled ones also on the seed. Prompt markers switch on
behaviours: FAIL (engine error after two tokens), SLOW (long, slow answer), TRIM (whitespace and
THUDM's [[训练时间]] placeholder around the answer), STOPME (the answer contains "STOP-HERE" split
over several tokens)."""
from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import httpx
import uvicorn

from server.client import EngineStats, LoadState, ModelInfo, ModelKind, Target
from server.errors import (AdapterUnavailable, ContextLengthExceeded, EngineDead, EngineNotReady, ModelNotFound,
                           Overloaded)
from server.sampling import SamplingParams
from server.sequence import FinishReason, RequestOutput, TokenLogprob

GMASK, SOP, OFFSET = 1, 2, 10
WORDS = ["你好", "，", "世界", " hello", "🙂", "模型", " world", "。", "P-Tuning", " 👋🏽", "中文", " ok"]


class FakeTokenizer:
    """One id per character (ord + OFFSET) after [gMASK] sop; HF-style call with right truncation."""

    vocab_size = 0x110000 + OFFSET

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [ord(c) + OFFSET for c in text]
        return [GMASK, SOP, *ids] if add_special_tokens else ids

    def __call__(self, text: str, max_length: int | None = None, truncation: bool = False) -> dict:
        ids = self.encode(text, add_special_tokens=False)
        if truncation and max_length is not None:
            ids = ids[:max(max_length - 2, 0)]
        return {"input_ids": [GMASK, SOP, *ids]}

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i - OFFSET) for i in ids if i >= OFFSET)


@dataclass
class Call:
    request_id: str
    targets: list[Target]
    params: SamplingParams


@dataclass
class FakeEngine:
    base_model_id: str = "fake-base"
    max_model_len: int = 512
    max_running: int = 1000  # requests; beyond this generate() raises Overloaded
    token_delay: float = 0.0
    start_delay: float = 0.0
    tokenizer: FakeTokenizer = field(default_factory=FakeTokenizer)
    calls: list[Call] = field(default_factory=list)
    running: dict[str, int] = field(default_factory=dict)  # request id -> live sequences
    aborted: set[str] = field(default_factory=set)
    _ready: bool = False
    _draining: bool = False
    _adapters: dict[str, ModelInfo] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.add_adapter("ad-a", pre_seq_len=8)
        self.add_adapter("ad-b", pre_seq_len=16, prefix_projection=True,
                         manifest={"source_prefix": "PFX:", "max_source_length": 64})
        self.add_adapter("team/ad-c", pre_seq_len=4)
        self._adapters["broken"] = ModelInfo("broken", ModelKind.ADAPTER, parent=self.base_model_id,
                                             state=LoadState.FAILED, error="pre_seq_len 8 does not fit: boom")

    def add_adapter(self, name: str, **kw) -> ModelInfo:
        info = ModelInfo(name, ModelKind.ADAPTER, parent=self.base_model_id, version="v1", created=1700000000,
                         fingerprint=f"fp_{name.replace('/', '_')}_v1", **kw)
        self._adapters[name] = info
        return info

    # ---- EngineClient ---------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._ready and not self._draining

    def models(self) -> list[ModelInfo]:
        base = ModelInfo(self.base_model_id, ModelKind.BASE, created=1700000000, fingerprint="fp_base")
        return [base, *self._adapters.values()]

    def resolve(self, model: str) -> ModelInfo:
        for info in self.models():
            if info.id == model:
                if info.state is LoadState.FAILED:
                    raise AdapterUnavailable(f"adapter {model} failed to load")
                return info
        raise ModelNotFound(f"no model {model}")

    def abort(self, request_id: str) -> None:
        if request_id in self.running:
            self.aborted.add(request_id)

    def stats(self) -> EngineStats:
        return EngineStats(num_running=sum(self.running.values()), per_model={"fake-base": {"requests": 1.0}})

    async def load_adapter(self, name: str, path: str | None = None) -> ModelInfo:
        return self.add_adapter(name, path=path, pre_seq_len=8)

    async def reload_adapter(self, name: str) -> ModelInfo:
        info = self.resolve(name)
        n = int(info.version.lstrip("v") or 1) + 1
        info.version, info.fingerprint = f"v{n}", f"fp_{name.replace('/', '_')}_v{n}"
        return info

    async def unload_adapter(self, name: str) -> None:
        if self._adapters.pop(name, None) is None:
            raise ModelNotFound(f"no adapter {name}")

    async def start(self) -> None:
        await asyncio.sleep(self.start_delay)
        self._ready = True

    async def shutdown(self, timeout: float = 30.0) -> None:
        self._draining = True
        deadline = time.monotonic() + timeout
        while self.running and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self.aborted.update(self.running)

    # ---- generation -----------------------------------------------------------------------
    def script(self, model: str, prompt: str, params: SamplingParams, choice: int) -> list[str]:
        if "SLOW" in prompt:
            return ["x"] * 400
        key = f"{model}|{prompt}" if params.greedy else f"{model}|{prompt}|{params.seed}|{choice}"
        rng = random.Random(key if params.greedy or params.seed is not None else None)
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 9))]
        if "TRIM" in prompt:
            words = ["  ", "\n", *words[:2], "[[训", "练时间]]", *words[2:], " ", "\n"]
        if "STOPME" in prompt:
            words = [*words[:2], "ST", "OP-", "HE", "RE", *words[2:]]
        return words

    async def generate(self, request_id: str, targets: list[Target], params: SamplingParams
                       ) -> AsyncIterator[RequestOutput]:
        if self._draining:
            raise EngineNotReady("shutting down")
        if len(self.running) >= self.max_running:
            raise Overloaded("queue full", retry_after=2)
        for t in targets:
            self.resolve(t.model)
            budget = len(t.prompt_ids) + (params.max_tokens or 0)
            if budget > self.max_model_len:
                raise ContextLengthExceeded(f"This model's maximum context length is {self.max_model_len} tokens. "
                                            f"However, you requested {budget} tokens.", "messages")
        self.calls.append(Call(request_id, targets, params))
        prompts = [self.tokenizer.decode(t.prompt_ids) for t in targets]
        scripts = [self.script(t.model, p, params, c) for t, p in zip(targets, prompts) for c in range(params.n)]
        self.running[request_id] = len(scripts)
        try:
            async for out in self._play(request_id, targets, prompts, scripts, params):
                yield out
        finally:
            self.running.pop(request_id, None)

    async def _play(self, request_id, targets, prompts, scripts, params) -> AsyncIterator[RequestOutput]:
        texts = [""] * len(scripts)
        sent = [0] * len(scripts)
        done = [False] * len(scripts)
        limit = params.max_tokens or 10_000
        delay = 0.05 if any("SLOW" in p for p in prompts) else self.token_delay
        for step in range(max(len(s) for s in scripts) + 1):
            await asyncio.sleep(delay)
            for i, script in enumerate(scripts):
                if done[i]:
                    continue
                target = targets[i // params.n]
                base = dict(request_id=request_id, index=i, prompt_tokens=len(target.prompt_ids),
                            completion_tokens=min(step + 1, len(script)), model=target.model)
                if request_id in self.aborted:
                    done[i] = True
                    yield RequestOutput(token_ids=[], text="", finish_reason=FinishReason.ABORT, **base)
                    continue
                if "FAIL" in prompts[i // params.n] and step == 2:
                    raise EngineDead("the engine step failed (injected)")
                finish = None
                if step < len(script):
                    texts[i] += script[step]
                    if step + 1 >= limit:
                        finish = FinishReason.LENGTH
                else:
                    finish = FinishReason.STOP
                    base["completion_tokens"] = len(script)
                full = texts[i]
                hits = [at for at in (full.find(stop) for stop in params.stop) if at >= 0]
                visible = min(hits) if hits else len(full)
                if hits:
                    finish = FinishReason.STOP
                elif finish is None:  # hold back a tail that may still become a stop string
                    for stop in params.stop:
                        k = next((k for k in range(min(len(stop) - 1, len(full)), 0, -1)
                                  if full.endswith(stop[:k])), 0)
                        visible = min(visible, len(full) - k)
                done[i] = finish is not None
                delta = texts[i][sent[i]:visible]
                sent[i] = visible
                token = script[step] if step < len(script) else ""
                ids = [ord(token[0]) + OFFSET] if token else []
                logprobs = None
                if params.logprobs is not None and token:
                    top = [(OFFSET + j, w, -0.5 - j) for j, w in enumerate(WORDS[:params.logprobs])]
                    logprobs = [TokenLogprob(ids[0], token, -0.25, top)]
                yield RequestOutput(token_ids=ids, text=delta, logprobs=logprobs, finish_reason=finish,
                                    fingerprint=f"fp_{target.model}", **base)


# ---- a real server in a thread, and SSE parsing --------------------------------------------
SSE_FRAMING = re.compile(r"^(data: [^\n]+\n\n|: [^\n]*\n\n)+data: \[DONE\]\n\n$")


def sse_payloads(raw: str) -> list[dict]:
    """The JSON payloads of a complete SSE body, after checking its framing byte for byte."""
    assert SSE_FRAMING.match(raw), f"bad SSE framing: {raw[:300]!r}"
    blocks = [b[len("data: "):] for b in raw.split("\n\n") if b.startswith("data: ")]
    assert blocks[-1] == "[DONE]" and "[DONE]" not in blocks[:-1]
    return [json.loads(b) for b in blocks[:-1]]


@dataclass
class LiveServer:
    url: str
    server: uvicorn.Server
    thread: threading.Thread


@contextlib.contextmanager
def serve(app, *, timeout_graceful_shutdown: float | None = None, wait_ready: bool = True) -> Iterator[LiveServer]:
    """Run `app` under uvicorn on a free 127.0.0.1 port in a thread (by default until /health is 200)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", log_config=None, lifespan="on",
                            timeout_graceful_shutdown=timeout_graceful_shutdown)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "uvicorn did not start"
    url = f"http://127.0.0.1:{port}"
    while wait_ready and httpx.get(url + "/health").status_code != 200:
        assert time.monotonic() < deadline + 20, "the engine did not become ready"
        time.sleep(0.02)
    try:
        yield LiveServer(url, server, thread)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
