"""AsyncEngine: the EngineClient the HTTP layer talks to.

Model work runs on one background thread (EngineCore); the asyncio loop only validates, queues and
relays. Deltas travel back with loop.call_soon_threadsafe into one asyncio.Queue per request.
Adapter loads run in the default executor, never on the loop.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections import deque
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from .adapter_files import AdapterVersion
from .adapters import AdapterRegistry
from .client import EngineStats, LoadState, ModelInfo, ModelKind, Target
from .engine_config import AdapterLoading, EngineConfig, auto_dtype
from .engine_core import CoreSnapshot, EngineCore, TargetSpec
from .errors import EngineDead, EngineNotReady, InvalidRequest, Overloaded
from .request_stream import RequestStream, validate_request
from .sampling import SamplingParams
from .sequence import RequestOutput

log = logging.getLogger(__name__)


class _Msg(Enum):
    """What the event loop asks of the engine thread, through the inbox."""

    ADD = "add"
    ABORT = "abort"
    CLEAR_CACHE = "clear_cache"


class AsyncEngine:
    def __init__(self, model: Any, tokenizer: Any, config: EngineConfig | None = None, *,
                 base_model_id: str = "chatglm2-6b", checkpoints_dir: str | Path | None = None,
                 adapters: dict[str, str] | None = None, quantization: str | int | None = None,
                 model_path: str | Path | None = None):
        self.config = config or EngineConfig()
        self.tokenizer = tokenizer
        self.base_model_id = base_model_id
        self.max_model_len = self.config.max_model_len
        self.model_path = str(model_path) if model_path else None
        self.created = int(time.time())  # the base model's `created` in /v1/models
        if quantization is None:
            self.quantization_bit = int(model.config.quantization_bit or 0)
        else:
            from chatglm.quant_format import QuantMode

            self.quantization_bit = QuantMode.parse(quantization).bits
        model_device = next(model.parameters()).device
        if model_device.type != torch.device(self.config.device).type:
            raise ValueError(f"the model is on {model_device} but EngineConfig.device is {self.config.device}")
        self.core = EngineCore(model, tokenizer, self.config)
        self.registry = AdapterRegistry(
            model.config, base_model_id=base_model_id, dtype=self.config.kv_dtype, device=self.config.device,
            max_prefix_len=self.config.max_prefix_len, max_resident=self.config.max_resident_adapters,
            quantization_bit=self.quantization_bit, checkpoints_dir=checkpoints_dir, adapters=adapters,
            watch=self.config.watch_adapters, base_path=model_path)
        if self.config.adapter_loading is AdapterLoading.EAGER:
            self.registry.load_all()
        self._cv = threading.Condition()
        self._inbox: deque[tuple[_Msg, Any]] = deque()
        # weak: a stream its reader dropped is collected, and its finaliser aborts the request
        self._streams: weakref.WeakValueDictionary[str, RequestStream] = weakref.WeakValueDictionary()
        self._snap = CoreSnapshot()
        self._queued = 0  # sequences accepted but not yet seen by the engine thread
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._accepting = True
        self._dead: BaseException | None = None

    @classmethod
    def from_paths(cls, model_path: str | Path, quantize: str | int | None = None,
                   dtype: torch.dtype | str | None = None, device: str = "cpu",
                   checkpoints_dir: str | Path | None = None, adapters: dict[str, str] | None = None,
                   base_model_id: str | None = None, **limits: Any) -> "AsyncEngine":
        """Load a base model folder (and its tokenizer) and build an engine; `limits` are EngineConfig fields."""
        from chatglm.checkpoint import load_model
        from chatglm.config import ChatGLMConfig, ConfigError
        from chatglm.tokenizer import ChatGLMTokenizer

        if dtype is None:
            try:
                stored = ChatGLMConfig.from_json(model_path).torch_dtype
            except ConfigError:
                stored = None  # load_model below says what is wrong with the folder
            dtype = auto_dtype(quantize, device, stored)
        config = EngineConfig(dtype=dtype, device=device, **limits)
        model = load_model(model_path, dtype=config.dtype, device=device, quantize=quantize,
                           half_vocab_weights=torch.device(device).type == "cpu")
        tokenizer = ChatGLMTokenizer.from_folder(model_path)
        return cls(model, tokenizer, config, base_model_id=base_model_id or Path(model_path).resolve().name,
                   checkpoints_dir=checkpoints_dir, adapters=adapters, quantization=quantize, model_path=model_path)

    # ---- lifecycle -------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._dead is None and self._accepting and not self._stopping

    async def start(self) -> None:
        self._ensure_thread()

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self.core.warmup()
            self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
            self._thread.start()

    async def shutdown(self, timeout: float = 30.0) -> None:
        self._accepting = False
        deadline = time.monotonic() + timeout
        while self._streams and time.monotonic() < deadline and self._dead is None:
            await asyncio.sleep(0.01)
        for rid in list(self._streams):
            self.abort(rid)
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    # ---- models ------------------------------------------------------------------------------
    def base_info(self) -> ModelInfo:
        return ModelInfo(id=self.base_model_id, kind=ModelKind.BASE, path=self.model_path, state=LoadState.LOADED,
                         fingerprint=self.registry.fingerprint(None), created=self.created)

    def models(self) -> list[ModelInfo]:
        return [self.base_info(), *self.registry.infos()]

    def resolve(self, model: str) -> ModelInfo:
        if model == self.base_model_id:
            return self.base_info()
        return self.registry.resolve(model)

    async def load_adapter(self, name: str, path: str | None = None) -> ModelInfo:
        if path is not None:
            self.registry.add(name, path)
        await asyncio.get_running_loop().run_in_executor(None, self.registry.acquire, name)
        return self.registry.info(name)

    async def reload_adapter(self, name: str) -> ModelInfo:
        await asyncio.get_running_loop().run_in_executor(None, self.registry.reload, name)
        return self.registry.info(name)

    async def unload_adapter(self, name: str) -> None:
        self.registry.unload(name)

    # ---- requests ----------------------------------------------------------------------------
    def generate(self, request_id: str, targets: list[Target], params: SamplingParams) -> RequestStream:
        """Validate and queue a request; the returned async iterator yields RequestOutput deltas.

        Raises at once: InvalidRequest / ContextLengthExceeded, ModelNotFound, AdapterUnavailable,
        Overloaded, EngineNotReady, EngineDead. An adapter that must first be loaded is loaded
        off the loop when iteration starts (its failure raises from `__anext__`). Leaving the
        iterator early (aclose, cancellation, garbage collection) aborts the request.
        """
        if self._dead is not None:
            raise EngineDead(f"the engine loop stopped: {self._dead!r}")
        if not self._accepting or self._stopping:
            raise EngineNotReady("the engine is shutting down")
        if not targets:
            raise InvalidRequest("a request needs at least one target", param="model")
        if request_id in self._streams:
            raise InvalidRequest(f"request id {request_id} is already running")
        for t in targets:
            self.resolve(t.model)
        validate_request(targets, params, self.config, self.core.num_slots,
                         self.core.runner.model.config.padded_vocab_size)
        num_seqs = len(targets) * params.n
        waiting = self._queued + self._snap.num_waiting
        if waiting + num_seqs > self.config.max_waiting:
            raise Overloaded(f"{waiting} sequences are waiting (max_waiting={self.config.max_waiting}); retry later")
        self._ensure_thread()
        versions: list[AdapterVersion | None] = [
            None if t.model == self.base_model_id else self.registry.peek(t.model) for t in targets]
        stream = RequestStream(self, request_id, targets, params, versions, asyncio.get_running_loop())
        self._streams[request_id] = stream
        with self._cv:
            self._queued += num_seqs
        return stream

    async def _load_versions(self, targets: list[Target], versions: list[AdapterVersion | None]) -> None:
        loop = asyncio.get_running_loop()
        for i, t in enumerate(targets):
            if t.model != self.base_model_id and versions[i] is None:
                versions[i] = await loop.run_in_executor(None, self.registry.acquire, t.model)

    def _submit(self, stream: RequestStream) -> None:
        specs = [TargetSpec(t.model, list(t.prompt_ids), v, self.registry.fingerprint(v))
                 for t, v in zip(stream.targets, stream.versions)]
        with self._cv:
            self._inbox.append((_Msg.ADD, (stream.request_id, specs, stream.params)))
            self._cv.notify()

    def abort(self, request_id: str) -> None:
        """Stop a request; its KV is freed before the next step. Safe from any thread, idempotent."""
        with self._cv:
            self._inbox.append((_Msg.ABORT, request_id))
            self._cv.notify()

    async def clear_prefix_cache(self) -> None:
        """Forget the KV kept for prompt reuse (done by the engine thread before its next step)."""
        done = asyncio.get_running_loop().create_future()
        loop = done.get_loop()
        with self._cv:
            self._inbox.append((_Msg.CLEAR_CACHE, lambda: loop.call_soon_threadsafe(done.set_result, None)))
            self._cv.notify()
        self._ensure_thread()
        await done

    def _release(self, num_seqs: int) -> None:
        """A stream closed before it was submitted: give back its place in the queue."""
        with self._cv:
            self._queued -= num_seqs

    def _forget(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    def stats(self) -> EngineStats:
        """Counters as of the engine thread's last iteration (never blocks on a running step)."""
        s = self._snap
        per_model = {m: dict(c) for m, c in s.per_model.items()}
        for c in per_model.values():
            c["ttft_mean_s"] = c["ttft_sum_s"] / c["ttft_count"] if c["ttft_count"] else 0.0
        return EngineStats(
            num_running=s.num_running, num_waiting=s.num_waiting + self._queued, kv_used_tokens=s.kv_used_tokens,
            kv_capacity_tokens=self.core.num_slots * self.core.runner.capacity,
            num_resident_adapters=self.registry.num_resident, per_model=per_model,
            kv_cached_tokens=s.kv_cached_tokens, prefix_cache_hits=s.prefix_cache_hits,
            prefix_cache_queries=s.prefix_cache_queries, prefix_cache_reused_tokens=s.prefix_cache_reused_tokens,
            kv_bytes=self.core.runner.kv_bytes, resident_adapter_bytes=self.registry.resident_bytes, steps=s.steps)

    # ---- the engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        core = self.core
        while True:
            with self._cv:
                while not self._inbox and not core.has_work() and not self._stopping:
                    self._cv.wait()
                if self._stopping and not self._inbox:
                    return
                items = list(self._inbox)
                self._inbox.clear()
            # queued until a snapshot holding them is out: admission reads _queued + snapshot.num_waiting
            moved = sum(len(p[1]) * p[2].n for k, p in items if k is _Msg.ADD)
            try:
                deltas: list[RequestOutput] = []
                for kind, payload in items:
                    if kind is _Msg.ADD:
                        self._add(*payload)
                    elif kind is _Msg.ABORT:
                        deltas += core.abort(payload)
                    else:
                        core.slots.clear_cache()
                        payload()
                if core.has_work():
                    with torch.inference_mode():
                        deltas += core.step()
                self._snap = core.snapshot()
                self._release(moved)
                self._deliver(deltas)
            except Exception as exc:  # noqa: BLE001 - the loop must report, not vanish
                log.exception("engine step failed; failing every request")
                self._dead = exc
                ids = core.fail_all()
                self._snap = core.snapshot()
                self._deliver([], failed=ids, exc=EngineDead(f"the engine loop failed: {exc!r}"))
                return

    def _add(self, request_id: str, specs: list[TargetSpec], params: SamplingParams) -> None:
        stream = self._streams.get(request_id)
        if stream is None or stream.closed:  # aborted before it reached the engine
            return
        if request_id in self.core.requests:  # an earlier request of that id has not been torn down yet
            self._deliver([], failed=[request_id], exc=InvalidRequest(f"request id {request_id} is still running"))
            return
        self.core.add_request(self.core.make_request(request_id, specs, params))

    def _deliver(self, deltas: list[RequestOutput], failed: list[str] = (), exc: BaseException | None = None) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, Any]]] = {}
        for d in deltas:
            s = self._streams.get(d.request_id)
            if s is not None:
                by_loop.setdefault(s.loop, []).append((s, d))
        for rid in failed:
            s = self._streams.get(rid)
            if s is not None:
                by_loop.setdefault(s.loop, []).append((s, exc))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(RequestStream.deliver_batch, batch)
            except RuntimeError:  # the loop is closed: nobody is listening
                pass
