"""The async iterator a request's caller reads deltas from, and the checks a request must pass."""
from __future__ import annotations

import asyncio
import math
from typing import TYPE_CHECKING, Any

from .client import Target
from .engine_config import EngineConfig
from .errors import ContextLengthExceeded, InvalidRequest
from .sampling import SamplingParams
from .sequence import RequestOutput

if TYPE_CHECKING:
    from .engine import AsyncEngine


def validate_request(targets: list[Target], params: SamplingParams, config: EngineConfig, num_slots: int,
                     vocab_size: int) -> None:
    p = params
    if p.n < 1 or p.n > min(config.max_num_seqs, num_slots):
        raise InvalidRequest(f"n must be between 1 and {min(config.max_num_seqs, num_slots)}, got {p.n}", "n")
    if not (math.isfinite(p.temperature) and p.temperature >= 0):
        raise InvalidRequest(f"temperature must be >= 0, got {p.temperature}", "temperature")
    if not 0 < p.top_p <= 1:
        raise InvalidRequest(f"top_p must be in (0, 1], got {p.top_p}", "top_p")
    if p.top_k < -1:
        raise InvalidRequest(f"top_k must be >= 0 (0 or -1 disable it), got {p.top_k}", "top_k")
    if p.max_tokens is not None and p.max_tokens < 1:
        raise InvalidRequest(f"max_tokens must be >= 1, got {p.max_tokens}", "max_tokens")
    if p.min_tokens < 0 or (p.max_tokens is not None and p.min_tokens > p.max_tokens):
        raise InvalidRequest(f"min_tokens must be between 0 and max_tokens, got {p.min_tokens}", "min_tokens")
    if p.logprobs is not None and not 0 <= p.logprobs <= config.max_logprobs:
        raise InvalidRequest(f"logprobs must be between 0 and {config.max_logprobs}, got {p.logprobs}", "logprobs")
    if not p.repetition_penalty > 0:
        raise InvalidRequest(f"repetition_penalty must be > 0, got {p.repetition_penalty}", "repetition_penalty")
    for name in ("presence_penalty", "frequency_penalty"):
        if not -2 <= getattr(p, name) <= 2:
            raise InvalidRequest(f"{name} must be between -2 and 2, got {getattr(p, name)}", name)
    if any(not isinstance(s, str) or not s for s in p.stop):
        raise InvalidRequest("stop strings must be non-empty strings", "stop")
    if any(not 0 <= t < vocab_size for t in p.stop_token_ids):
        raise InvalidRequest(f"stop_token_ids must be token ids in [0, {vocab_size})", "stop_token_ids")
    if len(targets) * p.n > config.max_waiting:  # could never be queued: a client error, not a 429 to retry
        raise InvalidRequest(f"this request needs {len(targets) * p.n} sequences ({len(targets)} model(s) x n={p.n}); "
                             f"the server queues at most {config.max_waiting} (--max-waiting)", "n")
    for t in targets:
        if not t.prompt_ids:
            raise InvalidRequest("the prompt is empty", "prompt")
        if min(t.prompt_ids) < 0 or max(t.prompt_ids) >= vocab_size:
            raise InvalidRequest(f"prompt token ids must be in [0, {vocab_size})", "prompt")
        need = len(t.prompt_ids) + (p.max_tokens or 1)
        if need > config.max_model_len:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {config.max_model_len} tokens. However, you requested "
                f"{need} tokens ({len(t.prompt_ids)} in the messages, {p.max_tokens or 1} in the completion). "
                f"Please reduce the length of the messages or completion.", "messages")


class RequestStream:
    """Async iterator of one request's deltas (choice index = target index * n + choice)."""

    def __init__(self, engine: "AsyncEngine", request_id: str, targets: list[Target], params: SamplingParams,
                 versions: list[Any], loop: asyncio.AbstractEventLoop):
        self.engine = engine
        self.request_id = request_id
        self.targets = targets
        self.params = params
        self.versions = versions
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.num_seqs = len(targets) * params.n
        self.remaining = self.num_seqs
        self.submitted = False
        self.closed = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.closed and self.queue.empty():
            raise StopAsyncIteration
        if not self.submitted:
            try:
                await self.engine._load_versions(self.targets, self.versions)
            except BaseException:
                self._close(abort=False)
                raise
            if self.closed:
                raise StopAsyncIteration
            self.submitted = True
            self.engine._submit(self)
        if self.remaining == 0:
            self._close(abort=False)
            raise StopAsyncIteration
        try:
            item = await self.queue.get()
        except asyncio.CancelledError:
            self._close(abort=True)
            raise
        if isinstance(item, BaseException):
            self._close(abort=False)
            raise item
        if item.finished:
            self.remaining -= 1
            if self.remaining == 0:
                self._close(abort=False)
        return item

    async def aclose(self) -> None:
        self._close(abort=True)

    def _close(self, abort: bool) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.submitted:
            self.engine._release(self.num_seqs)
        elif abort and self.remaining:
            self.engine.abort(self.request_id)
        self.engine._forget(self.request_id)

    def __del__(self) -> None:
        if not getattr(self, "closed", True):
            self._close(abort=True)

    @staticmethod
    def deliver_batch(batch: list[tuple["RequestStream", Any]]) -> None:
        """Runs on the request's event loop (scheduled by the engine thread)."""
        for stream, item in batch:
            if not stream.closed:
                stream.queue.put_nowait(item)
