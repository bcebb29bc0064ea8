"""The engine's door for the HTTP layer: what server/app.py may call, and the records it gets back.

server/engine.py implements `EngineClient`; tests of the HTTP layer may use a fake that does too.
Adapter names exist only here and at the HTTP edge; inside the engine an adapter is an int id.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from .sampling import SamplingParams
from .sequence import RequestOutput


class ModelKind(str, Enum):
    BASE = "base"
    ADAPTER = "adapter"


class LoadState(str, Enum):
    LOADED = "loaded"  # resident, ready to serve
    AVAILABLE = "available"  # found on disk, loads on first use
    FAILED = "failed"  # refused; `error` says why


@dataclass
class ModelInfo:
    id: str
    kind: ModelKind
    parent: str | None = None  # the base model id, for adapters
    path: str | None = None
    pre_seq_len: int = 0
    prefix_projection: bool = False
    version: str = ""  # content hash of the checkpoint, changes when it is rewritten
    state: LoadState = LoadState.LOADED
    error: str | None = None
    created: int = 0
    fingerprint: str = ""
    # The training manifest: source_prefix, max_source_length, quantization it was trained on, ...
    manifest: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # e.g. trained on int4, served on bf16


@dataclass
class Target:
    """One (model, prompt) pair of a request; a fan-out request has several."""

    model: str
    prompt_ids: list[int]


@dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_used_tokens: int = 0
    kv_capacity_tokens: int = 0
    num_resident_adapters: int = 0
    per_model: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> counters
    kv_cached_tokens: int = 0  # tokens of finished sequences kept for prompt-prefix reuse
    prefix_cache_hits: int = 0  # admissions that reused cached KV ...
    prefix_cache_queries: int = 0  # ... out of all admissions
    prefix_cache_reused_tokens: int = 0
    kv_bytes: int = 0  # the KV cache tensor
    resident_adapter_bytes: int = 0  # prefix K/V of loaded adapters
    steps: int = 0


class EngineClient(Protocol):
    base_model_id: str
    max_model_len: int

    @property
    def ready(self) -> bool: ...

    def models(self) -> list[ModelInfo]: ...

    def resolve(self, model: str) -> ModelInfo:
        """The model (base or adapter) by id; raises errors.ModelNotFound / AdapterUnavailable."""

    def generate(self, request_id: str, targets: list[Target], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Stream deltas for every choice (index = target_index * params.n + choice).

        Raises errors.Overloaded when the wait queue is full, errors.InvalidRequest/ContextLengthExceeded
        for requests that cannot run. Closing the iterator early aborts the request.
        """

    def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...

    async def load_adapter(self, name: str, path: str | None = None) -> ModelInfo: ...

    async def reload_adapter(self, name: str) -> ModelInfo: ...

    async def unload_adapter(self, name: str) -> None: ...

    async def start(self) -> None: ...

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop admitting, let running requests finish up to `timeout`, then abort the rest."""
