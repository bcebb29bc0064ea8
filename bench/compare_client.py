"""One streaming OpenAI /v1/completions client for every server of bench/compare.py, with vLLM `bench serve`
metric definitions (shared/docs/openai-contract.md §5.1):

- TTFT: request sent -> first streamed chunk whose choice carries text;
- ITL: gaps between consecutive chunks with text (chunks written together give ~0 gaps, as in vLLM);
- TPOT: (E2E - TTFT) / (output tokens - 1) per request;
- E2E: request sent -> last chunk with text;
- output tok/s: all output tokens of a level / the level's wall time (closed loop, `concurrency` in flight).

Output tokens come from the stream's `usage` chunk. The request body is the same for every server except
`extra` (each server's way to say "ignore eos"), which is the only per-server difference.
"""
from __future__ import annotations

import asyncio
import json
import math
import statistics
import time
from dataclasses import dataclass, field


@dataclass
class Sample:
    ttft: float
    e2e: float
    tokens: int
    text_chunks: int
    gaps: list[float] = field(default_factory=list)


def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default, which vLLM's bench uses)."""
    if not values:
        return float("nan")
    v = sorted(values)
    k = (len(v) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def summarize(samples: list[Sample], wall: float, expected_tokens: int) -> dict:
    ttft = [s.ttft * 1e3 for s in samples]
    tpot = [(s.e2e - s.ttft) / (s.tokens - 1) * 1e3 for s in samples if s.tokens > 1]
    itl = [g * 1e3 for s in samples for g in s.gaps]
    e2e = [s.e2e * 1e3 for s in samples]
    tokens = sum(s.tokens for s in samples)
    out = {"requests": len(samples), "wall_s": wall, "output_tokens": tokens, "output_tok_s": tokens / wall,
           "request_s": len(samples) / wall,
           "all_lengths_exact": all(s.tokens == expected_tokens for s in samples),
           "chunks_per_token": sum(s.text_chunks for s in samples) / max(tokens, 1)}
    for name, vals in (("ttft_ms", ttft), ("tpot_ms", tpot), ("itl_ms", itl), ("e2e_ms", e2e)):
        for p in (50, 90, 99):
            out[f"{name}_p{p}"] = percentile(vals, p)
        out[f"{name}_mean"] = statistics.fmean(vals) if vals else float("nan")
    return out


class CompletionsClient:
    def __init__(self, base_url: str, model: str, extra: dict, timeout: float = 1800):
        import httpx

        self.model, self.extra = model, extra
        self.http = httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=httpx.Limits(max_connections=64))

    async def close(self) -> None:
        await self.http.aclose()

    async def wait_ready(self, proc, deadline_s: float) -> None:
        import httpx

        deadline = time.monotonic() + deadline_s
        while True:
            try:
                if (await self.http.get("/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not become ready in time")
            await asyncio.sleep(0.5)

    async def one(self, prompt: str, max_tokens: int) -> Sample:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "stream": True, **self.extra}
        t0 = time.perf_counter()
        first = last = None
        gaps: list[float] = []
        tokens = chunks = 0
        async with self.http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.perf_counter()
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"stream error: {chunk['error']}")
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    chunks += 1
                    if first is None:
                        first = now
                    else:
                        gaps.append(now - last)
                    last = now
        if first is None:
            raise RuntimeError("the stream carried no text")
        return Sample(first - t0, last - t0, tokens, chunks, gaps)

    async def level(self, prompts: list[str], max_tokens: int, concurrency: int) -> dict:
        """Closed loop: all prompts, `concurrency` in flight at any time."""
        sem = asyncio.Semaphore(concurrency)

        async def guarded(p: str) -> Sample:
            async with sem:
                return await self.one(p, max_tokens)

        t0 = time.perf_counter()
        samples = await asyncio.gather(*(guarded(p) for p in prompts))
        return summarize(list(samples), time.perf_counter() - t0, max_tokens)
