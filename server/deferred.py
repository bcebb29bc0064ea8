"""DeferredEngine: an EngineClient whose real engine is built on a worker thread when start() runs, so the
HTTP port is up and /health answers 503 while the weights load (llama.cpp's behaviour)."""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from .client import EngineClient, EngineStats, ModelInfo, Target
from .errors import EngineNotReady
from .sampling import SamplingParams


class DeferredEngine:
    def __init__(self, build: Callable[[], EngineClient], base_model_id: str, max_model_len: int):
        self._build = build
        self._engine: EngineClient | None = None
        self.base_model_id = base_model_id
        self.max_model_len = max_model_len

    @property
    def ready(self) -> bool:
        return self._engine is not None and self._engine.ready

    @property
    def engine(self) -> EngineClient:
        if self._engine is None:
            raise EngineNotReady("The model is still loading; retry shortly.")
        return self._engine

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer  # type: ignore[attr-defined]

    async def start(self) -> None:
        engine = await asyncio.get_running_loop().run_in_executor(None, self._build)
        self.base_model_id, self.max_model_len = engine.base_model_id, engine.max_model_len
        await engine.start()
        self._engine = engine

    async def shutdown(self, timeout: float = 30.0) -> None:
        if self._engine is not None:
            await self._engine.shutdown(timeout)

    def models(self) -> list[ModelInfo]:
        return [] if self._engine is None else self._engine.models()

    def resolve(self, model: str) -> ModelInfo:
        return self.engine.resolve(model)

    def generate(self, request_id: str, targets: list[Target], params: SamplingParams):
        return self.engine.generate(request_id, targets, params)

    def abort(self, request_id: str) -> None:
        if self._engine is not None:
            self._engine.abort(request_id)

    def stats(self) -> EngineStats:
        return EngineStats() if self._engine is None else self._engine.stats()

    async def load_adapter(self, name: str, path: str | None = None) -> ModelInfo:
        return await self.engine.load_adapter(name, path)

    async def reload_adapter(self, name: str) -> ModelInfo:
        return await self.engine.reload_adapter(name)

    async def unload_adapter(self, name: str) -> None:
        await self.engine.unload_adapter(name)
