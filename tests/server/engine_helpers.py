"""Shared pieces of the engine tests: building an engine on the fixture, draining streams."""
from __future__ import annotations

import asyncio
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from server.client import Target
from server.engine import AsyncEngine
from server.sampling import SamplingParams
from server.sequence import FinishReason, RequestOutput

BASE = "tiny"
ADAPTERS = ("ptuning-pre8", "ptuning-pre8-proj")


def copy_adapters(fixture_dir: Path, root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in ADAPTERS:
        shutil.copytree(fixture_dir / name, root / name)
    return root


def make_engine(fixture_dir: Path, checkpoints: Path | None = None, **limits) -> AsyncEngine:
    limits.setdefault("max_num_seqs", 16)
    limits.setdefault("max_model_len", 512)
    limits.setdefault("max_prefix_len", 16)
    return AsyncEngine.from_paths(fixture_dir / "model", base_model_id=BASE, checkpoints_dir=checkpoints, **limits)


@dataclass
class Choice:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    texts: list[str] = field(default_factory=list)  # every delta's text, in order
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    logprobs: list = field(default_factory=list)
    deltas: list[RequestOutput] = field(default_factory=list)


async def collect(stream) -> dict[int, Choice]:
    out: dict[int, Choice] = {}
    async for d in stream:
        c = out.setdefault(d.index, Choice())
        assert c.finish_reason is None, "a delta after the choice finished"
        c.token_ids += d.token_ids
        c.text += d.text
        c.texts.append(d.text)
        c.deltas.append(d)
        c.logprobs += d.logprobs or []
        c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason
    return out


async def run_one(engine: AsyncEngine, rid: str, model: str, prompt: list[int], **params) -> Choice:
    out = await collect(engine.generate(rid, [Target(model, prompt)], SamplingParams(**params)))
    assert list(out) == [0]
    return out[0]


def greedy_cases(expected: dict, model: str) -> list[tuple[str, list[int], list[int]]]:
    """(case, prompt ids without padding, expected new ids) for every recorded greedy generation."""
    section = expected["base"] if model == BASE else expected["ptuning"][model]
    cases = []
    for name, g in section["generate"].items():
        for i, s in enumerate(g["sequences"]):
            ids = [t for t, m in zip(s["input_ids"], s["attention_mask"]) if m]
            cases.append((f"{model}:{name}:{i}", ids, s["new_ids"]))
    return cases


async def wait_idle(engine: AsyncEngine, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.stats()
        if s.num_running == 0 and s.num_waiting == 0:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"engine not idle: {engine.stats()}")
