"""Bandwidth of the AVX2 weight-only kernel alone at decode shapes (one activation row), against torch's
read bandwidth in the same process: is a batch-1 decode step's matmul memory-bound?

    python bench/kernel_bw.py [--threads 2] [--bits 8] [--rows 1] [--repeats 20]

Weights are the chatglm2-6b layer's four linears, 28 copies of each (one per layer, 6 GB at int8), called
layer by layer as a decode step does, so every call reads its weights from DRAM, not cache.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.quant import bandwidth_gbs  # noqa: E402
from chatglm.quant_kernels import native_unavailable_reason  # noqa: E402

SHAPES = {"query_key_value": (4608, 4096), "dense": (4096, 4096), "dense_h_to_4h": (27392, 4096),
          "dense_4h_to_h": (4096, 13696)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bits", type=int, default=8, choices=[8, 4])
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--repeats", type=int, default=10)
    a = p.parse_args()
    reason = native_unavailable_reason()
    if reason:
        raise SystemExit(reason)
    torch.set_num_threads(a.threads)
    gen = torch.Generator().manual_seed(0)
    first = {name: torch.randint(-127, 128, (n, k * a.bits // 8), dtype=torch.int8, generator=gen)
             for name, (n, k) in SHAPES.items()}
    layers = [{name: (w.clone(), torch.rand(w.shape[0], generator=gen) / 100,
                      torch.randn(a.rows, SHAPES[name][1], dtype=torch.bfloat16, generator=gen))
               for name, w in first.items()} for _ in range(a.layers)]  # copies: every call reads DRAM
    total = sum(w.numel() for layer in layers for w, _, _ in layer.values())
    best_bw, median_bw = bandwidth_gbs(a.threads)
    per_name = {name: [] for name in SHAPES}
    steps = []
    for _ in range(a.repeats):
        t_step = time.perf_counter()
        for layer in layers:
            for name, (w, s, x) in layer.items():
                t = time.perf_counter()
                torch.ops.chatglm_quant.mm(x, w, s, None, a.bits)
                per_name[name].append(time.perf_counter() - t)
        steps.append(time.perf_counter() - t_step)
    step = statistics.median(steps)
    print(f"torch {torch.__version__}, {a.threads} threads, int{a.bits}, {a.rows} activation row(s), "
          f"{total / 1e9:.2f} GB of weights")
    print(f"read bandwidth (torch sum): best {best_bw:.1f} GB/s, median {median_bw:.1f} GB/s")
    print(f"all linears of {a.layers} layers: median {step * 1e3:.0f} ms = {total / step / 1e9:.1f} GB/s "
          f"({100 * total / step / 1e9 / best_bw:.0f}% of best), best {min(steps) * 1e3:.0f} ms")
    for name, (n, k) in SHAPES.items():
        med = statistics.median(per_name[name])
        nbytes = n * k * a.bits // 8
        print(f"  {name:16s} {n:6d} x {k:5d}: {med * 1e6:8.0f} us = {nbytes / med / 1e9:5.1f} GB/s")


if __name__ == "__main__":
    main()
