"""The serving engine on a CUDA device: THUDM's greedy tokens on the fixture, then throughput on the
chatglm2-6b shape with many adapters.

    python bench/cuda_engine.py --fixture ../shared/fixtures/chatglm2-tiny [--gen 32]

1. Fixture: every greedy generation THUDM recorded for the base and both P-Tuning v2 adapters, all
   submitted at once (one mixed batch), on the GPU in fp32 and bf16; with int8/int4 weights, THUDM's
   greedy runs of its quantized weights in fp32. How many come out token for token as THUDM's: fp32
   float and fp32 int8 (dequantize + cuBLAS in fp32) should be all; bf16 runs, and int4 (whose CUDA
   kernel takes bf16 activations), round differently from THUDM's fp32 runs and are reported.
2. chatglm2-6b shape with random weights (bench/quant.py's build), bf16 / int8 / int4: engine decode
   tok/s (decode-only steps) at concurrency 1, 16 and 64, the last over 64 distinct adapters of
   pre_seq_len 128 too. Eager PyTorch, no CUDA graphs.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine import load_run, make_adapters  # noqa: E402  (bench/engine.py)
from quant import build  # noqa: E402  (bench/quant.py)

from chatglm.quantize import QuantMode  # noqa: E402
from chatglm.tokenizer import ChatGLMTokenizer  # noqa: E402
from server.client import Target  # noqa: E402
from server.engine import AsyncEngine  # noqa: E402
from server.engine_config import EngineConfig  # noqa: E402
from server.sampling import SamplingParams  # noqa: E402

ADAPTERS = ("ptuning-pre8", "ptuning-pre8-proj")


def greedy_cases(expected: dict, quantize: int | None) -> list[tuple[str, list[int], list[int]]]:
    """(model, prompt ids without padding, THUDM's new ids) for every recorded greedy generation; for a
    quantized base, those of THUDM's quantized weights run in fp32 (base only)."""
    cases = []
    for model in ("tiny",) if quantize else ("tiny", *ADAPTERS):
        section = expected["base"] if model == "tiny" else expected["ptuning"][model]
        runs = section["generate"]
        if quantize:
            runs = expected["quantization"]["bits"][str(quantize)]["generate_dequant_fp32"]
        for g in runs.values():
            for s in g["sequences"]:
                cases.append((model, [t for t, m in zip(s["input_ids"], s["attention_mask"]) if m], s["new_ids"]))
    return cases


async def tokens(engine: AsyncEngine, rid: str, model: str, prompt: list[int], n: int) -> list[int]:
    out = []
    async for d in engine.generate(rid, [Target(model, prompt)], SamplingParams(temperature=0.0, max_tokens=n)):
        out += d.token_ids
    return out


async def fixture_run(fixture: Path, dtype: str, quantize: int | None, device: str) -> str:
    expected = json.loads((fixture / "expected.json").read_text())
    cases = greedy_cases(expected, quantize)
    engine = AsyncEngine.from_paths(fixture / "model", quantize=quantize, dtype=dtype, device=device,
                                    base_model_id="tiny", adapters={a: str(fixture / a) for a in ADAPTERS},
                                    max_num_seqs=64, max_model_len=512, max_prefix_len=16)
    await engine.start()
    try:
        got = await asyncio.gather(*(tokens(engine, f"c{i}", m, p, len(new)) for i, (m, p, new) in enumerate(cases)))
    finally:
        await engine.shutdown()
    same = sum(g == new for g, (_, _, new) in zip(got, cases))
    first = sum(g[:1] == new[:1] for g, (_, _, new) in zip(got, cases))
    q = f"int{quantize}" if quantize else "float"
    return (f"{dtype:8} {q:5}: {same}/{len(cases)} generations equal THUDM's token for token, "
            f"first token equal in {first}/{len(cases)} (one mixed batch, {engine.stats().steps} steps)")


def profile_steps(engine: AsyncEngine, n: int) -> list:
    """Profile `n` single-stream decode steps inside the engine thread (where the steps run)."""
    from torch.profiler import ProfilerActivity, profile

    core, orig, calls = engine.core, engine.core.step, []
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])

    def step():
        calls.append(1)
        if len(calls) == 3:  # after the prefill and a first decode step
            prof.start()
        out = orig()
        if len(calls) == 3 + n:
            prof.stop()
        return out

    core.step = step
    return [prof, core, orig]


async def profiled_run(engine: AsyncEngine, n: int) -> list[str]:
    prof, core, orig = profile_steps(engine, n)
    try:
        await load_run(engine, ["bench"], 1, 16, n + 4)
    finally:
        core.step = orig
    avg = prof.key_averages()
    return [avg.table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=70),
            avg.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=70)]


async def throughput(fixture: Path, mode_name: str, gen: int, device: str, profile: bool = False) -> list[str]:
    mode = QuantMode.parse(None if mode_name == "bf16" else mode_name)
    t0 = time.perf_counter()
    model = build(mode, device=device)
    build_s = time.perf_counter() - t0
    tmp = Path(tempfile.mkdtemp(prefix="cuda-adapters-"))
    adapters = make_adapters(tmp, model.config, 64)
    config = EngineConfig(max_num_seqs=64, max_model_len=320, max_prefix_len=128, dtype=torch.bfloat16,
                          device=device, max_resident_adapters=64)
    engine = AsyncEngine(model, ChatGLMTokenizer.from_folder(fixture / "model"), config, base_model_id="bench",
                         adapters=adapters, quantization=None if mode is QuantMode.NONE else mode.value)
    await engine.start()
    lines = []
    try:
        await load_run(engine, ["bench"] * 4, 4, 16, 8)  # warm-up
        if profile:
            for table in await profiled_run(engine, 6):
                print(table, flush=True)
        for label, models, clients in (("c1 base", ["bench"] * 2, 1), ("c16 base", ["bench"] * 16, 16),
                                       ("c64 base", ["bench"] * 64, 64),
                                       ("c64 64 adapters", list(adapters), 64)):
            r = await load_run(engine, models, clients, 16, gen)
            lines.append(f"{mode_name:5} {label:16}: decode {r['decode_tok_s']:8.1f} tok/s, with prefill "
                         f"{r['e2e_tok_s']:8.1f} tok/s, decode step {r['step_ms_median']:6.1f} ms")
        if device == "cuda":
            lines.append(f"{mode_name:5} GPU memory peak {torch.cuda.max_memory_allocated() / 1e9:.2f} GB "
                         f"(weights, {len(adapters)} adapters, KV for 64 x 448 tokens), build {build_s:.1f} s")
    finally:
        await engine.shutdown()
        del engine, model
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixture", type=Path, required=True, help="the chatglm2-tiny fixture folder")
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--modes", default="bf16,int8,int4", help="6B-shape throughput runs ('' for none)")
    ap.add_argument("--profile", action="store_true", help="profile single-stream engine decode (first mode)")
    ap.add_argument("--skip-fixture", action="store_true")
    ap.add_argument("--device", default="cuda", help="cpu runs the fixture part here, to try the script")
    args = ap.parse_args()
    name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"device {name}, torch {torch.__version__}", flush=True)
    print("== fixture greedy generations, engine on CUDA ==", flush=True)
    for dtype, q in () if args.skip_fixture else (("float32", None), ("bfloat16", None), ("float32", 8), ("bfloat16", 8), ("float32", 4),
                     ("bfloat16", 4)):
        try:
            print(asyncio.run(fixture_run(args.fixture, dtype, q, args.device)), flush=True)
        except Exception as exc:
            print(f"{dtype} {q}: failed: {type(exc).__name__}: {exc}", flush=True)
    print("== chatglm2-6b shape, random weights: engine decode throughput on CUDA ==", flush=True)
    for mode_name in filter(None, args.modes.split(",")):
        try:
            for line in asyncio.run(throughput(args.fixture, mode_name, args.gen, args.device, args.profile)):
                print(line, flush=True)
        except Exception as exc:
            print(f"{mode_name}: failed: {type(exc).__name__}: {exc}", flush=True)


if __name__ == "__main__":
    main()
