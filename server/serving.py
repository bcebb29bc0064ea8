"""The generation routes: parse → validate → prompt ids per target → engine.generate → render.

Errors before the first token are ordinary JSON errors (the first output is awaited before the SSE
response starts); after that an error is one `data: {"error": ...}` event and `[DONE]`. A client that
goes away aborts its request, streaming or not."""
from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import anyio
from pydantic import ValidationError
from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import Response

from .chat_prompt import chat_prompt_ids, completion_prompt_ids, split_messages
from .client import EngineClient, LoadState, ModelInfo, Target
from .errors import AdapterUnavailable, InvalidRequest, ModelNotFound, ServingError
from .http_errors import AdapterRefused, error_event, from_validation_error
from .metrics import Metrics, Outcome, RequestTracker
from .protocol import ChatCompletionRequest, CompletionRequest, GenerationRequest
from .sequence import RequestOutput
from .streaming import Endpoint, Job, Renderer

log = logging.getLogger("server.requests")
T = TypeVar("T")
R = TypeVar("R", bound=GenerationRequest)
SSE_PING_SECONDS = 15


class ClientGone(Exception):
    """The client disconnected while we waited for the engine."""


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def race_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, or cancel it and raise ClientGone as soon as the client disconnects."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)  # let the engine stream see the cancellation
    raise ClientGone()


def combined_fingerprint(infos: list[ModelInfo]) -> str | None:
    prints = [i.fingerprint for i in infos]
    if not all(prints):
        return None
    if len(set(prints)) == 1:
        return prints[0]
    return "fp_" + hashlib.sha256("|".join(prints).encode()).hexdigest()[:16]


def resolve_model(engine: EngineClient, name: str, param: str = "model") -> ModelInfo:
    """engine.resolve with the OpenAI 404 wording; a refused adapter says so and is not retried."""
    try:
        return engine.resolve(name)
    except ModelNotFound:
        raise ModelNotFound(f"The model `{name}` does not exist or you do not have access to it.", param) from None
    except AdapterUnavailable as e:
        known = next((m for m in engine.models() if m.id == name), None)
        if known is not None and known.state is LoadState.FAILED:
            raise AdapterRefused(f"The adapter `{name}` cannot be served: {known.error or e.message}", param) from e
        raise


class Generation:
    """One engine request: its output iterator, metrics, and abort-on-exit."""

    def __init__(self, engine: EngineClient, job: Job, targets: list[Target], tracker: RequestTracker):
        self.engine = engine
        self.job = job
        self.tracker = tracker
        self.finished = False
        self.first_at: float | None = None  # when the first engine output arrived
        self.iterator = engine.generate(job.response_id, targets, job.params)

    async def next(self) -> RequestOutput | None:
        try:
            out = await self.iterator.__anext__()
        except StopAsyncIteration:
            self.finished = True
            return None
        if self.first_at is None:
            self.first_at = time.perf_counter()
            if self.job.fingerprint is None:  # an adapter loaded on first use: its version is known now
                try:
                    infos = [self.engine.resolve(m) for m in dict.fromkeys(self.job.target_models)]
                    self.job.fingerprint = combined_fingerprint(infos)
                except ServingError:  # changed meanwhile: answer without a fingerprint
                    pass
        self.tracker.output(out, self.job.target_of(out.index))
        return out

    async def close(self, outcome: Outcome) -> None:
        self.tracker.finish(outcome)
        if not self.finished:
            self.engine.abort(self.job.response_id)  # sync first: the await below may be cancelled
        aclose = getattr(self.iterator, "aclose", None)
        if aclose is not None:
            with anyio.CancelScope(shield=True):
                try:
                    await aclose()
                except Exception:  # the engine's own cleanup failing must not hide the outcome
                    log.exception("closing the engine stream of %s failed", self.job.response_id)


class GenerationHandler:
    def __init__(self, engine: EngineClient, metrics: Metrics, check_ready: Callable[[], None]):
        self.engine = engine
        self.metrics = metrics
        self.check_ready = check_ready

    async def _parse(self, request: Request, cls: type[R]) -> R:
        body = await request.body()
        try:
            req = cls.model_validate_json(body or b"{}", strict=True)  # JSON types as the schema says, as OpenAI
        except ValidationError as e:
            raise from_validation_error(e) from None
        for param, why in req.unsupported():
            raise InvalidRequest(why, param)
        ignored = req.ignored_fields()
        if ignored:
            log.info("ignoring unknown request fields: %s", ", ".join(ignored))
        return req

    def _resolve(self, req: GenerationRequest) -> list[ModelInfo]:
        return [resolve_model(self.engine, name, "models" if req.models else "model") for name in req.target_models()]

    def _job(self, endpoint: Endpoint, req: GenerationRequest, infos: list[ModelInfo], targets: list[Target],
             prefix: str) -> Job:
        return Job(endpoint=endpoint, response_id=f"{prefix}-{uuid.uuid4().hex}", created=int(time.time()),
                   model=req.model, target_models=[t.model for t in targets],
                   prompt_lens=[len(t.prompt_ids) for t in targets], params=req.to_sampling_params(),
                   fingerprint=combined_fingerprint(infos), stream=req.stream,
                   include_usage=bool(req.stream_options and req.stream_options.include_usage),
                   fan_out=req.models is not None)

    async def chat(self, request: Request) -> Response:
        arrival = time.perf_counter()
        self.check_ready()
        req = await self._parse(request, ChatCompletionRequest)
        query, history = split_messages(req.messages)
        infos = self._resolve(req)
        tokenizer = self.engine.tokenizer  # type: ignore[attr-defined]
        targets = [Target(name, chat_prompt_ids(tokenizer, query, history, info.manifest))
                   for name, info in zip(req.target_models(), infos)]
        job = self._job(Endpoint.CHAT, req, infos, targets, "chatcmpl")
        return await self._run(request, job, targets, bool(req.logprobs), arrival)

    async def completion(self, request: Request) -> Response:
        arrival = time.perf_counter()
        self.check_ready()
        req = await self._parse(request, CompletionRequest)
        infos = self._resolve(req)
        prompts = completion_prompt_ids(self.engine.tokenizer, req.prompt)  # type: ignore[attr-defined]
        targets = [Target(name, ids) for name in req.target_models() for ids in prompts]
        job = self._job(Endpoint.COMPLETION, req, infos, targets, "cmpl")
        return await self._run(request, job, targets, req.logprobs is not None, arrival)

    async def _run(self, request: Request, job: Job, targets: list[Target], want_logprobs: bool,
                   arrival: float) -> Response:
        log.info("%s %s model=%s targets=%d choices=%d prompt_tokens=%s stream=%s", job.endpoint.value,
                 job.response_id, job.model, len(targets), job.num_choices, job.prompt_lens, job.stream)
        tracker = self.metrics.tracker(job.endpoint.value, job.model_of, arrival)
        try:
            gen = Generation(self.engine, job, targets, tracker)  # the engine validates and queues at once
        except Exception:
            tracker.finish(Outcome.ERROR)
            raise
        self.metrics.preprocess.observe(time.perf_counter() - arrival)
        renderer = Renderer(job, want_logprobs)
        try:
            if job.stream:
                first = await race_disconnect(request, gen.next())
                if first is None:
                    renderer.check_complete()  # an empty stream is an engine error, still sent as JSON
                return EventSourceResponse(self._events(gen, renderer, first), sep="\n", ping=SSE_PING_SECONDS)
            body = await race_disconnect(request, self._collect(gen, renderer))
        except ClientGone:
            log.info("client went away before the answer; aborted %s", job.response_id)
            await gen.close(Outcome.CLIENT_GONE)
            return Response(status_code=499)
        except AdapterUnavailable as e:  # its first load failed: refused for good until its files change
            await gen.close(Outcome.ERROR)
            failed = {m.id: m for m in self.engine.models() if m.state is LoadState.FAILED}
            name = next((n for n in dict.fromkeys(job.target_models) if n in failed), None)
            if name is None or isinstance(e, AdapterRefused):
                raise
            raise AdapterRefused(f"The adapter `{name}` cannot be served: {failed[name].error}", e.param) from e
        except BaseException:
            await gen.close(Outcome.ERROR)
            raise
        await gen.close(Outcome.SUCCESS)
        return Response(body, media_type="application/json")

    async def _collect(self, gen: Generation, renderer: Renderer) -> str:
        while (out := await gen.next()) is not None:
            renderer.states[out.index].push(out)
        return renderer.response()

    async def _events(self, gen: Generation, renderer: Renderer, first: RequestOutput | None) -> AsyncIterator[str]:
        outcome = Outcome.CLIENT_GONE
        try:
            try:
                out = first
                first_write = self.metrics.first_write
                while out is not None:
                    for event in renderer.chunks(out):
                        if first_write is not None:  # the HTTP layer's share of TTFT after the engine
                            first_write.observe(time.perf_counter() - gen.first_at)
                            first_write = None
                        yield event
                    out = await gen.next()
                renderer.check_complete()
                if gen.job.include_usage:
                    yield renderer.usage_chunk()
                outcome = Outcome.SUCCESS
            except Exception as exc:  # after the first byte: report in-stream, then end normally
                log.warning("stream %s failed: %s", gen.job.response_id, exc,
                            exc_info=not isinstance(exc, ServingError))
                outcome = Outcome.ERROR
                yield error_event(exc)
            yield "[DONE]"
        finally:
            if outcome is Outcome.CLIENT_GONE:
                log.info("client went away mid-stream; aborted %s", gen.job.response_id)
            await gen.close(outcome)
