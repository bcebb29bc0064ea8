"""Our server vs `transformers serve --continuous-batching` on the same weights, same machine, same run.

    python bench/compare.py [--servers ours-bf16,ours-int8,hf-bf16] [--concurrency 1,4,16]
                            [--input-len 32] [--output-len 32] [--server-cpus 1] [--threads 1]
                            [--workdir ~/.cache/chatglm-bench/compare] [--plot docs/compare_transformers.png]

A mid-size ChatGLM2 (hidden 1024, 24 layers, 8 heads x 128, 2 KV groups, ffn 3424, vocab 65024) with
random weights is saved once in THUDM's folder layout and converted to transformers' GlmForCausalLM
(bench/glm_convert.py, bench/compare_setup.py). Each server runs in turn as a subprocess pinned with
`taskset` to the same CPUs with the same thread count (OMP/MKL threads, and --torch-threads for ours),
the client (bench/compare_client.py) is pinned to the other CPUs. Every server gets the same prompts
(identical token ids under both tokenizers), greedy decoding, eos ignored, and the same KV budget
(16 sequences x 256 tokens). Prints a markdown table with ours/theirs ratios and writes a PNG plot.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.compare_client import CompletionsClient  # noqa: E402
from bench.compare_setup import FIXTURE_MODEL, ensure_models, make_prompts  # noqa: E402

MAX_SEQS, MAX_LEN, BATCH_TOKENS, PAGE = 16, 256, 2048, 32
SERVERS = ("ours-bf16", "ours-int8", "hf-bf16")  # also available: hf-fp32 (same values, fp32 weights in memory)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(name: str, ours_dir: Path, glm_dir: Path, port: int, threads: int) -> tuple[list[str], str, dict]:
    """(argv, model id to request, per-server request extras that make it ignore eos)."""
    if name.startswith("ours-"):
        cmd = [sys.executable, "-m", "server", "--model", str(ours_dir), "--model-name", "base", "--host", "127.0.0.1",
               "--port", str(port), "--torch-threads", str(threads), "--device", "cpu",
               "--max-model-len", str(MAX_LEN), "--max-prefix-len", "1", "--max-num-seqs", str(MAX_SEQS),
               "--max-num-batched-tokens", str(BATCH_TOKENS), "--log-level", "warning"]
        # bf16: the checkpoint's weights as they are; int8: THUDM-format int8 linears quantized from them
        # at load, activations in the dtype the server picks for its int8 kernel (--dtype auto)
        cmd += ["--quantize", "int8"] if name == "ours-int8" else ["--quantize", "none", "--dtype", "bfloat16"]
        return cmd, "base", {"ignore_eos": True, "stream_options": {"include_usage": True}}
    if name in ("hf-bf16", "hf-fp32"):
        exe = Path(sys.executable).with_name("transformers")
        dtype = "bfloat16" if name == "hf-bf16" else "float32"
        cmd = [str(exe), "serve", str(glm_dir), "--continuous-batching", "--device", "cpu", "--dtype", dtype,
               "--host", "127.0.0.1", "--port", str(port), "--cb-block-size", str(PAGE),
               "--cb-num-blocks", str(MAX_SEQS * MAX_LEN // PAGE), "--cb-max-batch-tokens", str(BATCH_TOKENS),
               "--log-level", "warning"]
        # transformers' /v1/completions rejects unknown fields; a request generation_config with
        # eos_token_id -1 is its way to not stop at eos (continuous batching treats -1 as "none").
        return cmd, str(glm_dir), {"generation_config": json.dumps({"eos_token_id": -1, "do_sample": False})}
    raise SystemExit(f"unknown server {name!r}; expected one of {', '.join(SERVERS)}, hf-fp32")


async def run_server(name: str, args, ours_dir: Path, glm_dir: Path, levels: list[tuple[int, list[str]]],
                     warmup: list[str]) -> dict:
    port = free_port()
    cmd, model, extra = server_command(name, ours_dir, glm_dir, port, args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false"}
    log_path = args.workdir / f"{name}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(["taskset", "-c", args.server_cpus, *cmd], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    client = CompletionsClient(f"http://127.0.0.1:{port}", model, extra)
    result = {"command": " ".join(cmd), "load_before": os.getloadavg(), "levels": {}}
    try:
        t0 = time.perf_counter()
        await client.wait_ready(proc, 900)
        # warm-up (lazy initialisation, first batches) on prompts of its own: both servers cache prompt
        # prefixes, so a measured prompt must never have been seen before
        await client.level(warmup[:2], 4, 1)
        await client.level(warmup[2:], 4, 4)
        result["ready_s"] = time.perf_counter() - t0
        for c, prompts in levels:
            r = await client.level(prompts, args.output_len, c)
            result["levels"][c] = r
            print(f"  {name} c={c}: {r['output_tok_s']:.2f} tok/s, TTFT p50 {r['ttft_ms_p50']:.0f} ms, "
                  f"TPOT p50 {r['tpot_ms_p50']:.0f} ms, lengths exact {r['all_lengths_exact']}", flush=True)
    except Exception as e:  # noqa: BLE001 - a failed server is reported, the others still run
        result["error"] = f"{type(e).__name__}: {e} (log: {log_path})"
        print(f"  {name} failed: {result['error']}", flush=True)
    finally:
        await client.close()
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        result["load_after"] = os.getloadavg()
    return result


def fmt(r: dict, key: str) -> str:
    return f"{r[key + '_p50']:.0f} / {r[key + '_p90']:.0f} / {r[key + '_p99']:.0f}"


def print_tables(results: dict, concurrency: list[int], theirs: str = "hf-bf16") -> list[str]:
    lines = ["| server | concurrency | requests | output tok/s | TTFT p50 / p90 / p99 ms | TPOT p50 / p90 / p99 ms | "
             "ITL p50 / p90 / p99 ms | E2E p50 ms |", "|---|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        for c in concurrency:
            r = res.get("levels", {}).get(c)
            if r:
                lines.append(f"| {name} | {c} | {r['requests']} | {r['output_tok_s']:.2f} | {fmt(r, 'ttft_ms')} | "
                             f"{fmt(r, 'tpot_ms')} | {fmt(r, 'itl_ms')} | {r['e2e_ms_p50']:.0f} |")
    base = results.get(theirs, {}).get("levels", {})
    if base:
        lines += ["", f"| ours / {theirs} | concurrency | output tok/s ratio | TTFT p50 ratio (theirs / ours) | "
                      "TPOT p50 ratio (theirs / ours) |", "|---|---|---|---|---|"]
        for name, res in results.items():
            if name.startswith("hf-"):
                continue
            for c in concurrency:
                r, b = res.get("levels", {}).get(c), base.get(c)
                if r and b:
                    lines.append(f"| {name} | {c} | {r['output_tok_s'] / b['output_tok_s']:.2f}x | "
                                 f"{b['ttft_ms_p50'] / r['ttft_ms_p50']:.2f}x | {b['tpot_ms_p50'] / r['tpot_ms_p50']:.2f}x |")
    print("\n".join(lines))
    return lines


def acceptance(results: dict, theirs: str = "hf-bf16") -> list[str]:
    base = results.get(theirs, {}).get("levels", {})
    out = []
    for name, res in results.items():
        lv = res.get("levels", {})
        if name.startswith("hf-") or not base or 16 not in lv or 1 not in lv or 16 not in base or 1 not in base:
            continue
        checks = [("output tok/s at c16 >= 4x theirs", lv[16]["output_tok_s"] >= 4 * base[16]["output_tok_s"]),
                  ("TTFT p50 at c16 <= 1/4 of theirs", lv[16]["ttft_ms_p50"] * 4 <= base[16]["ttft_ms_p50"]),
                  ("TTFT p50 at c1 <= theirs", lv[1]["ttft_ms_p50"] <= base[1]["ttft_ms_p50"])]
        out += [f"{name}: {text}: {'MET' if ok else 'NOT MET'}" for text, ok in checks]
    print("\n".join(out))
    return out


def plot(results: dict, concurrency: list[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=80)
    for name, res in results.items():
        lv = res.get("levels", {})
        cs = [c for c in concurrency if c in lv]
        if not cs:
            continue
        axes[0].plot(cs, [lv[c]["output_tok_s"] for c in cs], "o-", label=name)
        line = axes[1].plot(cs, [lv[c]["ttft_ms_p50"] / 1e3 for c in cs], "o-", label=f"{name} p50")[0]
        axes[1].plot(cs, [lv[c]["ttft_ms_p90"] / 1e3 for c in cs], "x--", color=line.get_color(), label=f"{name} p90")
        line = axes[2].plot(cs, [lv[c]["tpot_ms_p50"] for c in cs], "o-", label=f"{name} TPOT p50")[0]
        axes[2].plot(cs, [lv[c]["itl_ms_p90"] for c in cs], "x--", color=line.get_color(), label=f"{name} ITL p90")
    for ax, label in zip(axes, ("output tok/s", "TTFT s", "ms per output token")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(concurrency, [str(c) for c in concurrency])
        ax.set_xlabel("concurrency")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", default=",".join(SERVERS))
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--requests", default="", help="requests per level, e.g. 4,8,32 (default max(4, 2 x concurrency))")
    p.add_argument("--input-len", type=int, default=32, help="prompt tokens, [gMASK] sop included")
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--server-cpus", default="1", help="taskset CPU list for the servers")
    p.add_argument("--client-cpus", default="0", help="CPU list for this client process")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of each server")
    p.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "chatglm-bench" / "compare")
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "compare.json")
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "compare_transformers.png")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    concurrency = [int(c) for c in args.concurrency.split(",")]
    counts = [int(n) for n in args.requests.split(",")] if args.requests else [max(4, 2 * c) for c in concurrency]
    os.sched_setaffinity(0, {int(c) for c in args.client_cpus.split(",")})
    t0 = time.perf_counter()
    ours_dir, glm_dir = ensure_models(args.workdir)
    prompts = make_prompts(FIXTURE_MODEL, sum(counts) + 6, args.input_len, args.seed)
    warmup = prompts[-6:]
    levels, i = [], 0
    for c, n in zip(concurrency, counts):
        levels.append((c, prompts[i:i + n]))
        i += n
    import torch
    import transformers

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    meta = {"argv": sys.argv, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "commit": commit.strip(), "cpus": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(), "input_len": args.input_len,
            "output_len": args.output_len, "server_cpus": args.server_cpus, "threads": args.threads}
    print(f"models ready in {time.perf_counter() - t0:.0f} s; {meta}", flush=True)
    results = {}
    for name in args.servers.split(","):
        print(f"{name}: starting (load average {os.getloadavg()[0]:.2f})", flush=True)
        results[name] = asyncio.run(run_server(name, args, ours_dir, glm_dir, levels, warmup))
    meta["total_s"] = time.perf_counter() - t0
    print()
    table = print_tables(results, concurrency)
    checks = acceptance(results)
    print(f"\ntotal {meta['total_s']:.0f} s; load average before/after each server: "
          + ", ".join(f"{n} {r['load_before'][0]:.1f}/{r['load_after'][0]:.1f}" for n, r in results.items()))
    plot(results, concurrency, args.plot, f"mid-size ChatGLM2, {args.input_len} in / {args.output_len} out, "
         f"server CPUs {args.server_cpus}, {args.threads} thread(s); torch {torch.__version__}, "
         f"transformers {transformers.__version__}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "results": results, "table": table, "acceptance": checks},
                                    indent=2, default=str))
    print(f"wrote {args.plot} and {args.json}")


if __name__ == "__main__":
    main()
