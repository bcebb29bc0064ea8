"""Serving-engine benchmark on a mid-size ChatGLM2 shape with random weights (docs/benchmarks.md, "Engine").

    python bench/engine.py [--formats bf16,int8] [--threads 2] [--gen 32] [--quick]

Per weight format it prints: the roofline inputs (read bandwidth, the model's matmuls at batch 1 and
16), single-stream decode tok/s, aggregate tok/s at concurrency 1/4/16/64, the same load over
1/8/64 distinct adapters vs the base alone, adapter load p50 and bytes per adapter, and the
second-turn time to first token with and without prompt-prefix reuse. Timings are engine-side
step durations (decode-only steps for decode rates); runs are short because the box is shared.
`--clock cpu` times everything (roofline included) in CPU seconds of the working thread instead of
wall seconds: with `--threads 1` that removes the time other tenants of the VM take from us.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatglm.checkpoint import save_prefix  # noqa: E402
from chatglm.config import ChatGLMConfig  # noqa: E402
from chatglm.model import ChatGLM  # noqa: E402
from chatglm.prefix import PrefixEncoder  # noqa: E402
from server.client import Target  # noqa: E402
from server.engine import AsyncEngine  # noqa: E402
from server.engine_config import EngineConfig  # noqa: E402
from server.sampling import SamplingParams  # noqa: E402

TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "chatglm2-tiny" / "model"
SHAPE = dict(num_layers=24, hidden_size=1024, num_attention_heads=8, kv_channels=128, multi_query_attention=True,
             multi_query_group_num=2, ffn_hidden_size=3424, padded_vocab_size=65024, seq_length=4096,
             add_qkv_bias=True)
PRE_SEQ_LEN = 128
CLOCK = {"wall": (time.perf_counter, 2), "cpu": (time.thread_time, 3)}  # timer, index in EngineCore.step_log
now, LOG = CLOCK["wall"]


def build_model(fmt: str) -> tuple[ChatGLM, torch.dtype]:
    """Random N(0, 0.02) weights; bf16 weights compute in bf16, int8 weights take fp32 activations."""
    config = ChatGLMConfig(**SHAPE)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = ChatGLM(config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "layernorm" in name else torch.randn_like(p) * 0.02)
    model.requires_grad_(False)  # as load_model leaves a served model
    if fmt == "int8":
        from chatglm.quantize import quantize_model

        quantize_model(model, "int8", include_output_layer=True)
        return model.eval(), torch.float32
    return model.to(torch.bfloat16).eval(), torch.bfloat16


def weight_bytes(model: ChatGLM) -> int:
    """Bytes one decode step streams: every parameter except the embedding table, of which one row."""
    emb = model.transformer.embedding.word_embeddings.weight
    n = sum(p.numel() * p.element_size() for p in model.parameters() if p is not emb)
    return n + emb[0].numel() * emb.element_size()


def best_of(fn, reps: int) -> tuple[float, float]:
    fn()
    ts = []
    for _ in range(reps):
        t = now()
        fn()
        ts.append(now() - t)
    return statistics.median(ts), min(ts)


@torch.inference_mode()  # as the engine runs: in grad mode bf16 linears measured 3x slower here
def roofline(model: ChatGLM, dtype: torch.dtype, reps: int) -> dict:
    big = torch.ones(64 * 2 ** 20)  # 256 MB: far beyond the 32 MB L3
    med, mn = best_of(lambda: big.sum(), reps)
    bw = big.numel() * 4 / mn
    big = None
    linears = [m for m in model.modules() if not list(m.children()) and hasattr(m, "in_features")]
    out = {"read_GBps": bw / 1e9, "weight_MB": weight_bytes(model) / 1e6}
    for M in (1, 16):
        xs = {m.in_features: torch.randn(M, m.in_features).to(dtype) for m in linears}

        def run():
            for m in linears:
                m(xs[m.in_features])
        out[f"mm{M}_ms"] = [x * 1e3 for x in best_of(run, reps)]
    flops = 2 * sum(m.in_features * m.out_features for m in linears)
    out["mm16_GFLOPs"] = 16 * flops / (out["mm16_ms"][1] / 1e3) / 1e9
    out["bw_tok_s"] = bw / (out["weight_MB"] * 1e6)
    out["flop16_tok_s"] = 16 / (out["mm16_ms"][1] / 1e3)
    out["roofline16_tok_s"] = min(16 * out["bw_tok_s"], out["flop16_tok_s"])
    return out


def make_adapters(root: Path, config: ChatGLMConfig, n: int) -> dict[str, str]:
    out = {}
    for i in range(n):
        torch.manual_seed(1000 + i)
        enc = PrefixEncoder(config, PRE_SEQ_LEN)
        with torch.no_grad():
            enc.embedding.weight.normal_(0, 0.5)
        save_prefix(enc, root / f"ad{i}", config)
        out[f"ad{i}"] = str(root / f"ad{i}")
    return out


async def load_run(engine: AsyncEngine, models: list[str], clients: int, prompt_len: int, gen: int) -> dict:
    """`clients` closed-loop clients work through one request per entry of `models`. Returns the
    engine-side decode rate (decode-only steps) and the wall-clock aggregate (all output tokens)."""
    core = engine.core
    await engine.clear_prefix_cache()  # every run prefills its prompts: no reuse from earlier runs
    core.step_log.clear()
    params = SamplingParams(temperature=0.0, max_tokens=gen, ignore_eos=True)
    todo = list(enumerate(models))
    nonce = time.monotonic_ns() % 50000

    async def client() -> int:
        n = 0
        while todo:
            i, model = todo.pop(0)
            prompt = [(nonce + 7 * i + j) % 60000 + 5 for j in range(prompt_len)]
            async for d in engine.generate(f"r{time.monotonic_ns()}-{i}", [Target(model, prompt)], params):
                n += len(d.token_ids)
        return n

    tokens = sum(await asyncio.gather(*(client() for _ in range(clients))))
    steps = [(e[0], e[1], e[LOG]) for e in core.step_log]
    dec = [(d, s) for d, p, s in steps if p == 0]
    dec_s = sum(s for _, s in dec)
    return {"decode_tok_s": sum(d for d, _ in dec) / dec_s if dec_s else 0.0,
            "e2e_tok_s": tokens / sum(s for _, _, s in steps),
            "step_ms_median": statistics.median(s for _, s in dec) * 1e3 if dec else 0.0}


async def ttft(engine: AsyncEngine, prompt: list[int], model: str) -> tuple[float, list[int]]:
    """Engine time until the first token (the request runs alone: every step before it is its prefill)."""
    engine.core.step_log.clear()
    first, ids = None, []
    async for d in engine.generate(f"t{time.monotonic_ns()}", [Target(model, prompt)],
                                   SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)):
        if first is None:
            first = sum(e[LOG] for e in engine.core.step_log)
        ids += d.token_ids
    return first, ids


async def bench_format(fmt: str, args) -> None:
    from chatglm.tokenizer import ChatGLMTokenizer

    print(f"\n=== {fmt} (threads {torch.get_num_threads()}, {args.clock} clock) ===", flush=True)
    model, dtype = build_model(fmt)
    rf = roofline(model, dtype, args.reps)
    print(f"roofline: read {rf['read_GBps']:.1f} GB/s, decode reads {rf['weight_MB']:.0f} MB/token -> "
          f"{rf['bw_tok_s']:.1f} tok/s bandwidth-bound single stream; matmuls batch 1 "
          f"{rf['mm1_ms'][0]:.1f}/{rf['mm1_ms'][1]:.1f} ms, batch 16 {rf['mm16_ms'][0]:.1f}/{rf['mm16_ms'][1]:.1f} ms "
          f"(median/min) = {rf['mm16_GFLOPs']:.1f} GFLOP/s -> {rf['flop16_tok_s']:.1f} tok/s; "
          f"roofline@16 = min({16 * rf['bw_tok_s']:.0f}, {rf['flop16_tok_s']:.1f}) = {rf['roofline16_tok_s']:.1f} tok/s",
          flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-adapters-"))
    adapters = make_adapters(tmp, model.config, args.adapters)
    config = EngineConfig(max_num_seqs=64, max_model_len=args.max_model_len, max_prefix_len=PRE_SEQ_LEN,
                          dtype=dtype, kv_dtype=torch.bfloat16, max_resident_adapters=args.adapters)
    engine = AsyncEngine(model, ChatGLMTokenizer.from_folder(TOKENIZER), config, base_model_id="bench",
                         adapters=adapters, quantization=8 if fmt == "int8" else None)
    await engine.start()
    loads = []
    for n in adapters:
        t = now()
        engine.registry.acquire(n)
        loads.append((now() - t) * 1e3)
    per = engine.registry.resident_bytes / len(adapters)
    print(f"adapters: {len(adapters)} x pre_seq_len {PRE_SEQ_LEN}, load p50 {statistics.median(loads):.1f} ms "
          f"(min {min(loads):.1f}, max {max(loads):.1f}); {per / 2 ** 20:.2f} MiB prefix K/V per resident adapter",
          flush=True)
    single = await load_run(engine, ["bench"], 1, 16, args.gen * 2)
    print(f"single stream: decode {single['decode_tok_s']:.1f} tok/s (step {single['step_ms_median']:.1f} ms)",
          flush=True)
    for c in args.concurrency:
        r = await load_run(engine, ["bench"] * c, c, 16, args.gen)
        line = f"concurrency {c:3d}: decode {r['decode_tok_s']:7.1f} tok/s, with prefill {r['e2e_tok_s']:7.1f} tok/s"
        if c == 16:
            line += f"  ({r['decode_tok_s'] / rf['roofline16_tok_s']:.0%} of roofline {rf['roofline16_tok_s']:.1f})"
        print(line, flush=True)
    names = list(adapters)
    # 64 requests through 16 clients (every one of 64 adapters gets used); the base runs first and
    # last and the ratios use the mean of the two, so a drift of the shared machine cancels out
    runs = {}
    for k in [0, *args.mixes, -1]:
        models = ["bench"] * 64 if k <= 0 else [names[i % k] for i in range(64)]
        runs[k] = await load_run(engine, models, 16, 16, args.gen)
    base = (runs[0]["decode_tok_s"] + runs[-1]["decode_tok_s"]) / 2
    base_e2e = (runs[0]["e2e_tok_s"] + runs[-1]["e2e_tok_s"]) / 2
    for k, r in runs.items():
        label = "base, first " if k == 0 else "base, last  " if k < 0 else f"{k:2d} adapters "
        print(f"64 requests at concurrency 16, {label}: decode {r['decode_tok_s']:6.1f} tok/s "
              f"({r['decode_tok_s'] / base:.2f}x base), with prefill {r['e2e_tok_s']:6.1f} tok/s "
              f"({r['e2e_tok_s'] / base_e2e:.2f}x)", flush=True)
    turn1 = [(13 * j) % 60000 + 5 for j in range(args.history)]
    for model in ("bench", names[0]):
        with_reuse, without = [], []
        for _ in range(args.reps_ttft):
            _, answer = await ttft(engine, turn1, model)
            turn2 = turn1 + answer + [(17 * j) % 60000 + 5 for j in range(16)]
            with_reuse.append((await ttft(engine, turn2, model))[0])
            await engine.clear_prefix_cache()
            without.append((await ttft(engine, turn2, model))[0])
            await engine.clear_prefix_cache()
        w, wo = statistics.median(with_reuse), statistics.median(without)
        print(f"second-turn TTFT ({model}, {len(turn2)} prompt tokens): with reuse {w * 1e3:.0f} ms, without "
              f"{wo * 1e3:.0f} ms -> {w / wo:.0%}", flush=True)
    await engine.shutdown()
    del engine, model
    gc.collect()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="int8,bf16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clock", choices=list(CLOCK), default="wall")
    ap.add_argument("--gen", type=int, default=32, help="tokens generated per request in the load runs")
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16, 64])
    ap.add_argument("--mixes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 64])
    ap.add_argument("--adapters", type=int, default=64)
    ap.add_argument("--history", type=int, default=256, help="first-turn prompt tokens of the multi-turn test")
    ap.add_argument("--max-model-len", type=int, default=320)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--reps-ttft", type=int, default=3)
    args = ap.parse_args()
    global now, LOG
    now, LOG = CLOCK[args.clock]
    torch.set_num_threads(args.threads)
    for fmt in args.formats.split(","):
        asyncio.run(bench_format(fmt, args))


if __name__ == "__main__":
    main()
