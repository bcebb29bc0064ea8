"""Soak: many requests against `python -m server` (a subprocess on 127.0.0.1) with mixed models, streaming and
not, and a share of clients that hang up mid-stream. Passes when no request failed, the engine is back to
0 running / 0 waiting sequences, resident memory grew < 5 % from the 200th finished request to the end, and
SIGTERM then stops the server with exit code 0.

    python bench/soak.py [--model DIR] [--adapter NAME=DIR ...] [--requests 2000] [--concurrency 32]
                         [--disconnect 0.2] [--stream 0.5] [--json out.json] [--url URL --api-key KEY]

Default model: the demo model (checkpoints/demo-base, adapters from checkpoints/ plus a second copy of
each so several prefixes share batches). Request i goes to model i mod M; a `--disconnect` share of requests
stream a long answer (ignore_eos) and close the connection after 1-4 events; of the rest, a `--stream`
share stream and the others do not. A request fails on a non-200 status, an error event, a missing
`[DONE]`, a finish_reason other than stop/length, or a transport error before it chose to hang up.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = ROOT / "checkpoints"
PROMPTS = ["类型#裙*颜色#蓝色*风格#清新*图案#蝴蝶结", "你好", "请介绍一下你自己", "hello, who are you?",
           "类型#上衣*材质#牛仔布*风格#简约", "写一首关于春天的诗", "1+1=?", "类型#裤*版型#宽松*风格#复古"]


@dataclass
class Outcome:
    kind: str  # ok | disconnected | failed
    model: str
    stream: bool
    seconds: float
    detail: str = ""


def rss_kib(pid: int) -> int:
    m = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(m.group(1))


def gauges(client: httpx.Client) -> dict:
    text = client.get("/metrics").text
    out: dict = {n: float(v) for n, v in re.findall(r"^chatglm_(num_requests_\w+) (\S+)$", text, re.M)}
    outcomes: Counter = Counter()
    for outcome, value in re.findall(r'^chatglm_requests_total\{[^}]*outcome="(\w+)"[^}]*\} (\S+)$', text, re.M):
        outcomes[outcome] += float(value)
    out["outcomes"] = dict(outcomes)
    return out


def _check_events(lines, hang_up_after: int | None) -> tuple[str, str]:
    """Read an SSE body; ('disconnected', '') when we hung up on purpose, else ('ok'|'failed', why)."""
    events, finishes = 0, 0
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            return ("ok", "") if finishes == 1 else ("failed", f"{finishes} finish_reason chunks")
        chunk = json.loads(data)
        if "error" in chunk:
            return "failed", f"error event: {chunk['error'].get('message')}"
        for choice in chunk["choices"]:
            reason = choice.get("finish_reason")
            if reason is not None:
                finishes += 1
                if reason not in ("stop", "length"):
                    return "failed", f"finish_reason {reason!r}"
        events += 1
        if hang_up_after is not None and events >= hang_up_after:
            return "disconnected", ""
    return "failed", "the stream ended without [DONE]"


def one_request(client: httpx.Client, i: int, model: str, rng: random.Random, disconnect: float, stream: float,
                max_tokens: int) -> Outcome:
    hang_up = rng.random() < disconnect
    streaming = hang_up or rng.random() < stream
    body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "max_tokens": 4 * max_tokens if hang_up else rng.randint(max(1, max_tokens // 4), max_tokens),
            "temperature": rng.choice([0, 0.8]), "seed": i, "stream": streaming, "ignore_eos": hang_up}
    t0 = time.perf_counter()
    try:
        if not streaming:
            r = client.post("/v1/chat/completions", json=body)
            if r.status_code != 200:
                why = f"HTTP {r.status_code}: {r.text[:200]}"
                return Outcome("failed", model, False, time.perf_counter() - t0, why)
            reason = r.json()["choices"][0]["finish_reason"]
            kind, why = ("ok", "") if reason in ("stop", "length") else ("failed", f"finish_reason {reason!r}")
            return Outcome(kind, model, False, time.perf_counter() - t0, why)
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return Outcome("failed", model, True, time.perf_counter() - t0,
                               f"HTTP {r.status_code}: {r.read()[:200]!r}")
            kind, why = _check_events(r.iter_lines(), rng.randint(1, 4) if hang_up else None)
        return Outcome(kind, model, True, time.perf_counter() - t0, why)  # leaving `with` early closes the socket
    except (httpx.HTTPError, ValueError, KeyError) as e:
        return Outcome("failed", model, streaming, time.perf_counter() - t0, f"{type(e).__name__}: {e}")


def run_load(url: str, key: str, models: list[str], requests: int, concurrency: int, *, disconnect: float = 0.2,
             stream: float = 0.5, max_tokens: int = 32, seed: int = 0, on_done=None) -> list[Outcome]:
    """Closed loop: `concurrency` client threads take request numbers until `requests` were sent."""
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker(w: int) -> None:
        rng = random.Random(seed * 1000 + w)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300) as client:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                out = one_request(client, i, models[i % len(models)], rng, disconnect, stream, max_tokens)
                with lock:
                    outcomes.append(out)
                    done = len(outcomes)
                if on_done is not None:
                    on_done(done)

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def wait_drained(client: httpx.Client, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        g = gauges(client)
        if (g["num_requests_running"] == 0 and g["num_requests_waiting"] == 0) or time.monotonic() > deadline:
            return g
        time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, key: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "server", "--model", str(args.model), "--port", str(port), "--api-key", key,
           "--checkpoints", str(args.checkpoints), "--torch-threads", str(args.threads), *args.server_arg]
    for spec in args.adapter or []:
        cmd += ["--adapter", spec]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            sys.exit(f"server exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            sys.exit(f"server not healthy after 300 s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.25)


def mirror_checkpoints(src: Path, dst: Path) -> None:
    """Adapters of `src` under their own names and again as NAME-b (same weights, separate adapter ids)."""
    for d in sorted(p for p in src.iterdir() if p.is_dir() and (p / "ptuning_manifest.json").is_file()):
        shutil.copytree(d, dst / d.name)
        shutil.copytree(d, dst / f"{d.name}-b")


def summarize(outcomes: list[Outcome], wall: float, rss: dict, drained: dict, exit_code: int | None) -> dict:
    kinds = Counter(o.kind for o in outcomes)
    failures = Counter(o.detail for o in outcomes if o.kind == "failed")
    ok = sorted(o.seconds for o in outcomes if o.kind == "ok")
    growth = (rss["end"] - rss["at_200"]) / rss["at_200"] if rss.get("at_200") else None
    return {"requests": len(outcomes), "ok": kinds["ok"], "disconnected": kinds["disconnected"],
            "failed": kinds["failed"], "failure_reasons": dict(failures.most_common(5)),
            "streamed": sum(o.stream for o in outcomes), "by_model": dict(Counter(o.model for o in outcomes)),
            "wall_s": round(wall, 1), "req_per_s": round(len(outcomes) / wall, 2),
            "latency_s_p50_p99": [round(ok[len(ok) // 2], 3), round(ok[int(len(ok) * 0.99)], 3)] if ok else None,
            "running_after": drained.get("num_requests_running"), "waiting_after": drained.get("num_requests_waiting"),
            "server_outcomes": drained.get("outcomes"), "rss_kib": rss,
            "rss_growth_from_200th": None if growth is None else round(growth, 4), "exit_code": exit_code}


def verdict(s: dict) -> list[str]:
    problems = []
    if s["failed"]:
        problems.append(f"{s['failed']} failed requests: {s['failure_reasons']}")
    if s["running_after"] != 0 or s["waiting_after"] != 0:
        problems.append(f"engine not idle after the run: running={s['running_after']} waiting={s['waiting_after']}")
    if s["rss_growth_from_200th"] is not None and s["rss_growth_from_200th"] >= 0.05:
        problems.append(f"RSS grew {s['rss_growth_from_200th']:.1%} from the 200th request to the end")
    if s["exit_code"] not in (None, 0):
        problems.append(f"SIGTERM exit code {s['exit_code']}")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=CHECKPOINTS / "demo-base")
    p.add_argument("--adapter", action="append", metavar="NAME=DIR", help="serve these (default: the checkpoints "
                   "folder's adapters, each twice)")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--disconnect", type=float, default=0.2, help="share of clients that hang up mid-stream")
    p.add_argument("--stream", type=float, default=0.5, help="share of the other requests that stream")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="server torch threads")
    p.add_argument("--server-arg", action="append", default=[], help="extra `python -m server` argument")
    p.add_argument("--url", help="use a running server instead (no RSS or SIGTERM check)")
    p.add_argument("--api-key", help="its key (with --url)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the summary here")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    proc = None
    if args.url:
        url, key = args.url, args.api_key or ""
    else:
        key = "sk-soak-" + secrets.token_hex(8)
        args.checkpoints = work / "checkpoints"
        args.checkpoints.mkdir()
        if not args.adapter:
            mirror_checkpoints(CHECKPOINTS if args.model == CHECKPOINTS / "demo-base" else args.model.parent,
                               args.checkpoints)
        proc, url = start_server(args, key, work / "server.log")
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    cards = client.get("/v1/models").json()["data"]
    models = [c["id"] for c in cards if c.get("state") != "failed"]
    print(f"soak: {args.requests} requests, concurrency {args.concurrency}, models {models}", file=sys.stderr)
    rss: dict[str, int] = {}

    def on_done(n: int) -> None:
        if proc is not None and n == min(200, args.requests):
            rss["at_200"] = rss_kib(proc.pid)
        if n % 250 == 0:
            print(f"  {n} done", file=sys.stderr)

    t0 = time.perf_counter()
    outcomes = run_load(url, key, models, args.requests, args.concurrency, disconnect=args.disconnect,
                        stream=args.stream, max_tokens=args.max_tokens, seed=args.seed, on_done=on_done)
    wall = time.perf_counter() - t0
    drained = wait_drained(client)
    exit_code = None
    if proc is not None:
        rss["end"] = rss_kib(proc.pid)
        proc.send_signal(signal.SIGTERM)
        exit_code = proc.wait(timeout=120)
        log = (work / "server.log").read_text(errors="replace")
        if key in log:
            print("the API key appears in the server log", file=sys.stderr)
            exit_code = exit_code or -1
        shutil.rmtree(work, ignore_errors=True)
    summary = summarize(outcomes, wall, rss, drained, exit_code)
    summary.update(model=str(args.model) if not args.url else args.url, concurrency=args.concurrency,
                   disconnect=args.disconnect, max_tokens=args.max_tokens, models=models)
    text = json.dumps(summary, indent=2, ensure_ascii=False)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    problems = verdict(summary)
    for line in problems:
        print("FAIL:", line, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
