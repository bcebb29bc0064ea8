"""HTTP serving benchmark: TTFT / TPOT / ITL percentiles and output tok/s at several concurrencies, over
HTTP (`python -m server` in a subprocess, streaming /v1/completions) and for the engine alone (AsyncEngine
in this process), with the same prompts, adapters and sampling. The difference is the HTTP layer's cost.

    python bench/serve.py [--model DIR] [--adapter NAME=DIR ...] [--concurrency 1,4,16] [--input-len 32]
                          [--output-len 64] [--threads 1] [--json out.json]

Definitions (vLLM's bench serve): TTFT = send -> first chunk with text; ITL = gaps between consecutive
text chunks; TPOT = (E2E - TTFT) / (output tokens - 1); output tok/s = all output tokens / batch wall time.
Requests are closed-loop: `concurrency` in flight, max(30, 3 x concurrency) per level, split in rounds that
alternate engine and HTTP (the box may be shared), greedy, ignore_eos,
round-robin over the base and the adapters. Default model: the chatglm2-tiny fixture (engine steps of a
few ms, so the HTTP share is as visible as it can be).
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT.parent / "shared" / "fixtures" / "chatglm2-tiny"
sys.path.insert(0, str(ROOT))


@dataclass
class Sample:
    ttft: float
    e2e: float
    tokens: int
    gaps: list[float] = field(default_factory=list)


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc; 10 ms resolution)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summarize(samples: list[Sample], wall: float, cpu: dict[str, float]) -> dict:
    ttft = [s.ttft * 1e3 for s in samples]
    tpot = [(s.e2e - s.ttft) / (s.tokens - 1) * 1e3 for s in samples if s.tokens > 1]
    itl = [g * 1e3 for s in samples for g in s.gaps]
    out = {"requests": len(samples), "output_tokens": sum(s.tokens for s in samples),
           "output_tok_s": sum(s.tokens for s in samples) / wall}
    out.update({f"{k}_cpu_ms_per_request": v * 1e3 / len(samples) for k, v in cpu.items()})
    for name, vals in (("ttft_ms", ttft), ("tpot_ms", tpot), ("itl_ms", itl)):
        out.update({f"{name}_p50": pct(vals, 50), f"{name}_p90": pct(vals, 90), f"{name}_p99": pct(vals, 99),
                    f"{name}_mean": statistics.fmean(vals) if vals else float("nan")})
    return out


async def closed_loop(run_one, jobs: list[tuple[str, list[int]]], concurrency: int) -> tuple[list[Sample], float]:
    sem = asyncio.Semaphore(concurrency)

    async def guarded(job):
        async with sem:
            return await run_one(*job)

    t0 = time.perf_counter()
    samples = await asyncio.gather(*(guarded(j) for j in jobs))
    return list(samples), time.perf_counter() - t0


class Clock:
    """Arrival times of one request's text chunks."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.first: float | None = None
        self.last = 0.0
        self.gaps: list[float] = []

    def text(self) -> None:
        now = time.perf_counter()
        if self.first is not None:
            self.gaps.append(now - self.last)
        self.first, self.last = self.first or now, now

    def sample(self, tokens: int) -> Sample:
        assert self.first is not None, "no text came back"
        return Sample(self.first - self.t0, self.last - self.t0, tokens, self.gaps)


# ---- the engine alone, in this process ------------------------------------------------------
async def engine_client(args):
    import torch

    from server.client import Target
    from server.engine import AsyncEngine
    from server.sampling import SamplingParams

    torch.set_num_threads(args.threads)
    engine = AsyncEngine.from_paths(args.model, adapters=args.adapters, base_model_id="base", device="cpu")
    await engine.start()
    counter = iter(range(10**9))

    async def one(model: str, ids: list[int], max_tokens: int | None = None) -> Sample:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens or args.output_len, ignore_eos=True)
        clock, tokens = Clock(), 0
        async for d in engine.generate(f"b{next(counter)}", [Target(model, ids)], params):
            tokens = d.completion_tokens
            if d.text:
                clock.text()
        return clock.sample(tokens)

    return engine, one


# ---- over HTTP: python -m server in a subprocess --------------------------------------------
def start_server(args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "server", "--model", str(args.model), "--model-name", "base", "--port", str(port),
           "--torch-threads", str(args.threads), "--device", "cpu", "--log-level", args.server_log_level,
           "--quantize", "none"]  # as the engine-alone path loads it
    for name, path in args.adapters.items():
        cmd += ["--adapter", f"{name}={path}"]
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / "bench-serve-server.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    return proc, f"http://127.0.0.1:{port}"


async def wait_ready(client, proc: subprocess.Popen) -> None:
    import httpx

    deadline = time.monotonic() + 300
    while True:
        try:
            if (await client.get("/health")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the server did not become ready; see bench-serve-server.log")
        await asyncio.sleep(0.2)


class RawSSE:
    """A lean keep-alive HTTP/1.1 client for SSE POSTs (asyncio streams, chunked decoding): the bench should
    time the server, not the client library (httpx's streaming costs a few ms per request on this box)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def events(self, path: str, body: dict):
        """Yields each `data:` payload (str) as it arrives."""
        data = json.dumps(body).encode()
        request = (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(data)}\r\n\r\n").encode() + data
        while True:
            reused = bool(self.idle)
            conn = self.idle.pop() if reused else await asyncio.open_connection(self.host, self.port)
            reader, writer = conn
            writer.write(request)
            try:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                break
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()
                if not reused:  # the server closed an idle keep-alive connection: retry on a new one
                    raise
        assert " 200 " in head.split("\r\n", 1)[0] and "chunked" in head.lower(), head
        buf = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = (await reader.readexactly(size + 2))[:-2]
            if size == 0:
                break
            buf += chunk
            *events, buf = buf.split(b"\n\n")
            for event in events:
                if event.startswith(b"data: "):
                    yield event[6:].decode()
        self.idle.append(conn)


def http_client(args, client: RawSSE):
    async def one(model: str, ids: list[int], max_tokens: int | None = None) -> Sample:
        body = {"model": model, "prompt": ids, "max_tokens": max_tokens or args.output_len, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        clock, tokens = Clock(), 0
        async for payload in client.events("/v1/completions", body):
            if payload == "[DONE]":
                continue
            chunk = json.loads(payload)
            if chunk["choices"] and chunk["choices"][0]["text"]:
                clock.text()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
        return clock.sample(tokens)

    return one


def server_side(metrics: str) -> dict:
    """Mean and bucket median of the server's own TTFT share: before the engine, and after its first output."""
    out = {}
    for name in ("chatglm_http_preprocess_seconds", "chatglm_http_first_chunk_seconds"):
        values = {}
        for line in metrics.splitlines():
            if line.startswith(name):
                key, value = line.rsplit(" ", 1)
                values[key] = float(value)
        count = values[f"{name}_count"]
        buckets = sorted((float(k.split('le="')[1].rstrip('"}')), v) for k, v in values.items() if "_bucket" in k)
        median = next(le for le, cum in buckets if cum >= count / 2)
        out[name.removeprefix("chatglm_http_").removesuffix("_seconds")] = {
            "mean": values[f"{name}_sum"] / count * 1e3, "p50_bucket_le": median * 1e3, "count": count}
    return out


async def paired_ttft(paths: dict, jobs_for, pairs: int) -> dict:
    """Concurrency 1, one engine request then one HTTP request (order alternating), 4 output tokens each:
    per-pair TTFT differences cancel the slow drift of background load on a shared machine."""
    diffs = []
    for i in range(pairs):
        jobs = jobs_for(1, warmup=True)
        model, ids = jobs[i % len(jobs)]
        order = ("engine", "http") if i % 2 == 0 else ("http", "engine")
        ttft = {p: (await paths[p](model, ids, 4)).ttft for p in order}
        diffs.append((ttft["http"] - ttft["engine"]) * 1e3)
    return {"pairs": pairs, "p25": pct(diffs, 25), "p50": pct(diffs, 50), "p75": pct(diffs, 75)}


async def run(args, jobs_for) -> tuple[dict, dict]:
    """Both paths, level by level and round by round in alternation, so background load hits both alike."""
    import httpx

    proc, url = start_server(args)
    engine, engine_one = await engine_client(args)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=256)) as client:
            await wait_ready(client, proc)
            host, port = url.rsplit("//", 1)[1].split(":")
            paths = {"engine": engine_one, "http": http_client(args, RawSSE(host, int(port)))}
            for one in paths.values():
                await closed_loop(one, jobs_for(1, warmup=True), 1)
            got = {(p, c): ([], 0.0, {}) for p in paths for c in args.concurrency}
            for r in range(args.rounds):
                for c in args.concurrency:
                    for p in (paths if r % 2 == 0 else reversed(list(paths))):
                        mine, server = time.process_time(), proc_cpu(proc.pid)
                        samples, wall = await closed_loop(paths[p], jobs_for(c), c)
                        cpu = {"process": time.process_time() - mine}  # engine path: engine + its loop
                        if p == "http":
                            cpu = {"client": cpu["process"], "server": proc_cpu(proc.pid) - server}
                        old = got[p, c]
                        got[p, c] = (old[0] + samples, old[1] + wall,
                                     {k: old[2].get(k, 0.0) + v for k, v in cpu.items()})
            out = {p: {c: summarize(*got[p, c]) for c in args.concurrency} for p in paths}
            out["http"]["paired_ttft_overhead_ms"] = await paired_ttft(paths, jobs_for, args.pairs)
            out["http"]["server_side_ms"] = server_side((await client.get("/metrics")).text)
            return out["engine"], out["http"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        await engine.shutdown(5)


def print_table(engine: dict, http: dict, concurrency: list[int]) -> None:
    print("| concurrency | path | TTFT p50 / p90 / p99 ms | TPOT p50 / p99 ms | ITL p50 / p99 ms | output tok/s |")
    print("|---|---|---|---|---|---|")
    for c in concurrency:
        for name, res in (("engine", engine[c]), ("HTTP", http[c])):
            print(f"| {c} | {name} | {res['ttft_ms_p50']:.1f} / {res['ttft_ms_p90']:.1f} / {res['ttft_ms_p99']:.1f} | "
                  f"{res['tpot_ms_p50']:.2f} / {res['tpot_ms_p99']:.2f} | {res['itl_ms_p50']:.2f} / "
                  f"{res['itl_ms_p99']:.2f} | {res['output_tok_s']:.0f} |")
    paired = http["paired_ttft_overhead_ms"]
    print(f"\nTTFT overhead of HTTP, paired at concurrency 1 ({paired['pairs']} pairs): p50 {paired['p50']:+.2f} ms "
          f"(p25 {paired['p25']:+.2f}, p75 {paired['p75']:+.2f})")
    side = http["server_side_ms"]
    print("server-side HTTP share of TTFT (from /metrics): " + ", ".join(
        f"{k} mean {v['mean']:.2f} ms (p50 <= {v['p50_bucket_le']:g} ms)" for k, v in side.items()))
    print("\nHTTP overhead (HTTP minus engine); CPU per request: engine path = engine + its loop in one process,"
          " HTTP path = server process + client process:")
    for c in concurrency:
        e, h = engine[c], http[c]
        print(f"  concurrency {c:2d}: TTFT p50 {h['ttft_ms_p50'] - e['ttft_ms_p50']:+.2f} ms, "
              f"TPOT p50 {h['tpot_ms_p50'] - e['tpot_ms_p50']:+.2f} ms, "
              f"output tok/s {h['output_tok_s'] / e['output_tok_s']:.2f}x; CPU/request engine "
              f"{e['process_cpu_ms_per_request']:.1f} ms, HTTP server {h['server_cpu_ms_per_request']:.1f} + client "
              f"{h['client_cpu_ms_per_request']:.1f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=FIXTURE / "model")
    p.add_argument("--adapter", action="append", metavar="NAME=DIR",
                   help="default: the fixture's ptuning-pre8 and ptuning-pre8-proj")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads for the engine (both runs)")
    p.add_argument("--server-log-level", default="info")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3, help="alternating engine/HTTP rounds per level")
    p.add_argument("--min-requests", type=int, default=30,
                   help="requests per level and path: max(this, 3 x concurrency), split over the rounds")
    p.add_argument("--pairs", type=int, default=60, help="paired engine/HTTP requests for the TTFT overhead")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    specs = args.adapter or [f"{n}={FIXTURE / n}" for n in ("ptuning-pre8", "ptuning-pre8-proj")]
    args.adapters = dict(a.split("=", 1) for a in specs)
    models = ["base", *args.adapters]

    calls = itertools.count()

    def jobs_for(c: int, warmup: bool = False) -> list[tuple[str, list[int]]]:
        rng = random.Random(f"{args.seed}-{next(calls)}")  # fresh prompts every batch: no prefix-cache hits
        n = len(models) if warmup else max(args.min_requests, 3 * c) // args.rounds
        return [(models[i % len(models)], [rng.randrange(300, 2900) for _ in range(args.input_len)])
                for i in range(n)]

    engine, http = asyncio.run(run(args, jobs_for))
    print(f"model {args.model}, adapters {list(args.adapters)}, input {args.input_len} tokens, output "
          f"{args.output_len} tokens, torch threads {args.threads}, cpu count {os.cpu_count()}\n")
    print_table(engine, http, args.concurrency)
    if args.json:
        args.json.write_text(json.dumps({"engine": engine, "http": http, "args": {
            k: str(v) for k, v in vars(args).items()}}, indent=2))


if __name__ == "__main__":
    main()
