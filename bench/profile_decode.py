"""Where a decode step of our engine spends its time, at batch 1 and batch 16, on the mid-size shape.

    python bench/profile_decode.py [--formats bf16,int8] [--batch 1,16] [--steps 6] [--prompt-len 64]
                                   [--threads 1] [--workdir ~/.cache/chatglm-bench/compare]

Runs the synchronous EngineCore in this process (no HTTP, no asyncio) on the model folder that
bench/compare.py uses. After the prompts are prefilled, `--steps` decode steps run under
torch.profiler; each step's wall time is split into:
- scheduler, sampler, output (detokenize, stop rules, deltas): wall time of those calls;
- the model forward: op self-time grouped into matmuls (linear/mm/addmm, quantized kernels),
  attention (SDPA, KV writes), other tensor ops (norms, rotary, SiLU, embedding, copies), and
  "python + dispatch" = forward wall time minus all op self-time.
HTTP's share is not here: compare TPOT over HTTP (bench/compare.py) with the step time printed here.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.compare_setup import ensure_models, make_prompts  # noqa: E402

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu",
          "chatglm_quant::mm", "chatglm_gemv::mv", "aten::linear", "aten::matmul")
ATTENTION = ("scaled_dot_product", "flash_attention", "aten::index_put", "aten::_index_put_impl", "attention")


def category(name: str) -> str:
    if name.startswith(MATMUL) or "gemm" in name.lower():
        return "matmul"
    if any(k in name for k in ATTENTION):
        return "attention"
    return "other ops"


class Timed:
    """Wrap a bound method and add up its wall time (the engine itself is not modified)."""

    def __init__(self, obj, name: str):
        self.fn = getattr(obj, name)
        self.total = 0.0
        setattr(obj, name, self)

    def __call__(self, *a, **kw):
        return self._timed(self.fn, *a, **kw)

    def __getattr__(self, name: str):  # other methods of a wrapped object (e.g. Sampler.prepare) count too
        attr = getattr(self.fn, name)
        return (lambda *a, **kw: self._timed(attr, *a, **kw)) if callable(attr) else attr

    def _timed(self, fn, *a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            self.total += time.perf_counter() - t


def profile(fmt: str, model_dir: Path, batch: int, steps: int, prompt_len: int, threads: int) -> dict:
    from chatglm.checkpoint import load_model
    from chatglm.tokenizer import ChatGLMTokenizer
    from server.engine_config import EngineConfig
    from server.engine_core import EngineCore, TargetSpec
    from server.sampling import SamplingParams

    torch.set_num_threads(threads)
    # "bf16", "fp32", "int8" (activations in the dtype the server picks), "int8:bf16" / "int8:fp32"
    weights, _, act = fmt.partition(":")
    quantize = weights if weights in ("int8", "int4") else None
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    dtype = dtypes.get(act or weights)
    if dtype is None:  # quantized weights, activation dtype as AsyncEngine.from_paths picks it
        from server.engine_config import auto_dtype

        dtype = auto_dtype(quantize, "cpu")
    model = load_model(model_dir, dtype=dtype, quantize=quantize)
    tok = ChatGLMTokenizer.from_folder(model_dir)
    config = EngineConfig(dtype=dtype, max_num_seqs=max(batch, 1), max_model_len=prompt_len + steps + 8,
                          max_prefix_len=1, max_num_batched_tokens=4096)
    core = EngineCore(model, tok, config)
    params = SamplingParams(temperature=0.0, max_tokens=steps + 4, ignore_eos=True)
    for i, text in enumerate(make_prompts(model_dir, batch, prompt_len, seed=7)):
        core.add_request(core.make_request(f"r{i}", [TargetSpec("base", tok.encode(text))], params))
    while any(s.first_token_time is None for r in core.requests.values() for s in r.seqs):
        core.step()  # prefill (not profiled)
    core.step()  # one warm decode step
    timers = {"scheduler": Timed(core.scheduler, "schedule"), "forward": Timed(core.runner, "execute"),
              "sampler": Timed(core, "sampler")}
    walls = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            t = time.perf_counter()
            core.step()
            walls.append(time.perf_counter() - t)
    ops = defaultdict(float)
    for evt in prof.key_averages():
        ops[category(evt.key)] += evt.self_cpu_time_total / 1e6
    top = sorted(((e.self_cpu_time_total / 1e6 / steps, e.key) for e in prof.key_averages()), reverse=True)[:8]
    wall = sum(walls)
    fwd = timers["forward"].total
    parts = {"matmul": ops["matmul"], "attention": ops["attention"], "other ops": ops["other ops"]}
    # ops also run in the sampler (argmax, softmax...): charge them to the sampler's wall time instead
    op_in_fwd = sum(parts.values())
    parts = {k: v * min(1.0, fwd / op_in_fwd) if op_in_fwd else v for k, v in parts.items()}
    parts["python + dispatch"] = max(fwd - sum(parts.values()), 0.0)
    parts["scheduler"] = timers["scheduler"].total
    parts["sampler"] = timers["sampler"].total
    parts["output + rest"] = max(wall - fwd - timers["scheduler"].total - timers["sampler"].total, 0.0)
    return {"format": fmt, "dtype": str(dtype), "batch": batch, "step_ms_median": statistics.median(walls) * 1e3,
            "step_ms_min": min(walls) * 1e3, "tok_s": batch / statistics.median(walls),
            "share": {k: v / wall for k, v in parts.items()}, "ms_per_step": {k: v / steps * 1e3 for k, v in parts.items()},
            "top_ops_ms": [(k, t * 1e3) for t, k in top]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--formats", default="bf16,int8")
    p.add_argument("--batch", default="1,16")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "chatglm-bench" / "compare")
    args = p.parse_args()
    model_dir, _ = ensure_models(args.workdir)
    print(f"torch {torch.__version__}, {args.threads} thread(s), load average at start "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    cols = ["matmul", "attention", "other ops", "python + dispatch", "scheduler", "sampler", "output + rest"]
    print("| format | batch | step ms (median / min) | tok/s | " + " | ".join(cols) + " |")
    print("|---|---|---|---|" + "---|" * len(cols))
    for fmt in args.formats.split(","):
        for b in (int(x) for x in args.batch.split(",")):
            r = profile(fmt, model_dir, b, args.steps, args.prompt_len, args.threads)
            shares = " | ".join(f"{r['ms_per_step'][c]:.1f} ms ({100 * r['share'][c]:.0f}%)" for c in cols)
            print(f"| {fmt} ({r['dtype'].removeprefix('torch.')}) | {b} | {r['step_ms_median']:.1f} / "
                  f"{r['step_ms_min']:.1f} | {r['tok_s']:.1f} | {shares} |", flush=True)
            print("    top ops per step: " + ", ".join(f"{k} {ms:.1f} ms" for k, ms in r["top_ops_ms"]), flush=True)


if __name__ == "__main__":
    main()
