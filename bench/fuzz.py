"""Longer schemathesis fuzz of `python -m server` (a subprocess on 127.0.0.1) against its own OpenAPI document:
every operation, schema-valid and schema-invalid requests, `--examples` of each. Passes when no response is a
5xx, every status is documented, every body and content type matches the document, every schema-invalid
request is refused, the server still answers afterwards, its log holds no traceback, and SIGTERM exits 0.
The suite runs the same checks with 12 examples (tests/hardening/test_fuzz.py).

    python bench/fuzz.py [--model DIR] [--adapter NAME=DIR ...] [--examples 200] [--seed 0] [--max-model-len 256]

Half of the generated bodies get a served model's name instead of the generated one (deterministically),
so the fuzz reaches the engine rather than stopping at 404.
"""
from __future__ import annotations

import argparse
import secrets
import signal
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHECK_NAMES = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
               "response_schema_conformance", "negative_data_rejection")


def checks() -> list:
    import schemathesis

    return [getattr(schemathesis.checks, name) for name in CHECK_NAMES]


def aim_at_real_models(case, models: tuple[str, ...], max_new: int | None = None) -> None:
    """Deterministically swap the generated model name for a served one in half of the schema-valid bodies
    (a schema-invalid body keeps its name: that may be the part that makes it invalid); `max_new` caps
    their max_tokens to keep a short run short."""
    from schemathesis.generation.modes import GenerationMode

    body = case.body
    positive = case.meta is not None and case.meta.generation.mode is GenerationMode.POSITIVE
    if positive and isinstance(body, dict) and isinstance(body.get("model"), str):
        pick = zlib.crc32(repr(sorted(body)).encode() + body["model"].encode())
        if pick % 2:
            body["model"] = models[pick % len(models)]
            _alternate_roles(body.get("messages"))
            if max_new is not None:
                for field in ("max_tokens", "max_completion_tokens"):
                    if not isinstance(body.get(field), int) or body[field] > max_new:
                        body[field] = max_new


def _alternate_roles(messages) -> None:
    """Chat semantics the schema cannot say: user/assistant turns, a user last, non-empty text."""
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        return
    if len(messages) % 2 == 0:
        messages.pop()
    for i, m in enumerate(messages):
        m["role"] = "assistant" if i % 2 else "user"
        m.pop("tool_calls", None)
        m.pop("function_call", None)
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            m["content"] = "hi"


def fuzz(url: str, key: str, models: tuple[str, ...], examples: int, seed: int) -> tuple[Counter, list[str]]:
    """Run every operation in both generation modes; (status counts per operation, failure reports)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation.modes import GenerationMode

    headers = {"Authorization": f"Bearer {key}"}
    doc = httpx.get(url + "/openapi.json", headers=headers, timeout=30).json()
    schema = schemathesis.openapi.from_dict(doc)
    schema.config.update(request_timeout=120)
    statuses: Counter = Counter()
    failures: list[str] = []
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @hypothesis_seed(seed)
            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def run(case) -> None:
                aim_at_real_models(case, models)
                response = case.call(base_url=url, headers=headers)
                statuses[f"{op.label} {mode.value} {response.status_code}"] += 1
                case.validate_response(response, checks=checks(), headers=headers)

            try:
                run()
            except Unsatisfiable:  # nothing in this operation can be made schema-invalid (no parameters)
                pass
            except (Exception, BaseExceptionGroup) as e:  # noqa: BLE001 - report it, fuzz the other operations
                failures.append(f"{op.label} ({mode.value}): {e}")
            print(f"  {op.label} {mode.value}: done", file=sys.stderr)
    return statuses, failures


def main(argv: list[str] | None = None) -> int:
    from bench.soak import CHECKPOINTS, mirror_checkpoints, start_server

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=CHECKPOINTS / "demo-base")
    p.add_argument("--adapter", action="append", metavar="NAME=DIR")
    p.add_argument("--examples", type=int, default=200, help="per operation and generation mode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-model-len", type=int, default=256, help="bounds every generation")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fuzz-"))
    args.checkpoints = work / "checkpoints"
    args.checkpoints.mkdir()
    if not args.adapter:
        mirror_checkpoints(CHECKPOINTS if args.model == CHECKPOINTS / "demo-base" else args.model.parent,
                           args.checkpoints)
    args.server_arg = ["--max-model-len", str(args.max_model_len), "--max-num-seqs", "8", "--max-waiting", "16"]
    key = "sk-fuzz-" + secrets.token_hex(8)
    proc, url = start_server(args, key, work / "server.log")
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    models = tuple(c["id"] for c in client.get("/v1/models").json()["data"] if c.get("state") != "failed")
    t0 = time.perf_counter()
    statuses, failures = fuzz(url, key, models, args.examples, args.seed)
    wall = time.perf_counter() - t0
    alive = client.post("/v1/chat/completions", json={"model": models[0], "max_tokens": 1,
                                                       "messages": [{"role": "user", "content": "hi"}]}).status_code
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=120)
    log = (work / "server.log").read_text(errors="replace")
    for line, n in sorted(statuses.items()):
        print(f"{n:6d}  {line}")
    print(f"{sum(statuses.values())} requests in {wall:.0f} s; models {list(models)}")
    problems = [*failures]
    if alive != 200:
        problems.append(f"the server did not answer after the fuzz (HTTP {alive})")
    if "Traceback" in log:
        problems.append("the server log holds a traceback:\n" + log[log.index("Traceback"):][:3000])
    if code != 0:
        problems.append(f"SIGTERM exit code {code}")
    if key in log:
        problems.append("the API key appears in the server log")
    for problem in problems:
        print("FAIL:", problem[:4000], file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
