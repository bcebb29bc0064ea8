"""Single-stream decode of our serving engine on the chatglm2-6b shape vs the memory-bandwidth bound,
measured in the same process and run (issue 9's last acceptance line).

    python bench/decode_bound.py [--threads 2] [--rounds 6] [--steps 6] [--act auto|bf16|fp32]
                                 [--quantize-output-layer]

The int8 model is bench/quant.py's `build` (random THUDM-format int8 linears materialized in place,
~6.5 GB: check `free -g` first), put in the activation dtype the server would use (`--act auto`:
AsyncEngine's choice). Under fp32 activations the embedding and output layer stay in their stored bf16,
as the server's `load_model(half_vocab_weights=True)` keeps them.
One greedy request runs through the synchronous EngineCore (scheduler, slot KV, sampler, detokenizer;
no HTTP). Bound = read bandwidth (torch sum over 1 GiB on huge pages, same threads) / bytes of weights
read per token (every layer, final norm, output layer, one embedding row). Two statistics:
- paired: the decode runs in `--rounds` blocks of `--steps` steps, each right after three reads; a
  block's median step is held against the best of its own reads, and the median over blocks is
  reported (bench/quant.py's `paired_ratios`);
- strict: the median step of all blocks against the best read of the whole run (bench/quant.py's
  `bandwidth_gbs` before and after the decode, best of 7 on normal and on huge pages, and every
  block's reads), with the best step beside it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.quant import (ReadProbe, activation_dtype, bandwidth_gbs, build, bytes_per_token,  # noqa: E402
                         paired_ratios, to_serving_dtype)
from chatglm.quant_format import QuantMode  # noqa: E402
from chatglm.tokenizer import ChatGLMTokenizer  # noqa: E402
from server.engine_config import EngineConfig  # noqa: E402
from server.engine_core import EngineCore, TargetSpec  # noqa: E402
from server.sampling import SamplingParams  # noqa: E402

TOKENIZER = ROOT.parent / "shared" / "fixtures" / "chatglm2-tiny" / "model"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=6, help="decode steps per round")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--act", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--quantize-output-layer", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    bw_before = bandwidth_gbs(args.threads)[0]
    dtype = activation_dtype(QuantMode.INT8, args.act)
    t0 = time.perf_counter()
    model = build(QuantMode.INT8, include_output_layer=args.quantize_output_layer)
    to_serving_dtype(model, dtype)  # as the server loads it
    build_s = time.perf_counter() - t0
    weight_gb = bytes_per_token(model) / 1e9
    tok = ChatGLMTokenizer.from_folder(TOKENIZER)
    core = EngineCore(model, tok, EngineConfig(dtype=dtype, max_num_seqs=1, max_model_len=256, max_prefix_len=1))
    ids = [tok.gmask_id, tok.sop_id] + [300 + 7 * i for i in range(args.prompt_len - 2)]
    params = SamplingParams(temperature=0.0, max_tokens=args.rounds * args.steps + 2, ignore_eos=True)
    core.add_request(core.make_request("r0", [TargetSpec("base", ids)], params))
    core.step()  # prefill
    core.step()  # first decode step: warm-up, not timed
    probe = ReadProbe(args.threads)
    rounds = []
    for _ in range(args.rounds):
        bw = probe.read_gbs(3)
        steps = []
        for _ in range(args.steps):
            t = time.perf_counter()
            core.step()
            steps.append(time.perf_counter() - t)
        rounds.append((bw, steps))
    bw_after = bandwidth_gbs(args.threads)[0]
    steps = [t for _, block in rounds for t in block]
    bw = max(bw_before, bw_after, *(b for b, _ in rounds))
    bound = bw / weight_gb
    med, best = 1 / statistics.median(steps), 1 / min(steps)
    paired = paired_ratios(rounds, weight_gb)
    print(f"torch {torch.__version__}, {args.threads} threads, activations {str(dtype).removeprefix('torch.')}, "
          f"output layer {str(model.transformer.output_layer.weight.dtype).removeprefix('torch.')}, "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}, build {build_s:.0f} s")
    print(f"weights read per token {weight_gb:.2f} GB; read bandwidth {bw_before:.1f} GB/s before, "
          f"{bw_after:.1f} GB/s after, {min(b for b, _ in rounds):.1f}-{max(b for b, _ in rounds):.1f} GB/s "
          f"between blocks")
    print("blocks: " + ", ".join(f"{b:.1f} GB/s {1e3 * statistics.median(block):.0f} ms {100 * r:.0f}%"
                                 for (b, block), r in zip(rounds, paired)))
    print(f"paired: median block at {100 * statistics.median(paired):.0f}% of its bound "
          f"({100 * min(paired):.0f}-{100 * max(paired):.0f}%) (target >= 70%)")
    print(f"strict: {med:.2f} tok/s median, {best:.2f} best over {len(steps)} steps against the run's best read "
          f"({bw:.1f} GB/s, bound {bound:.2f} tok/s) = {100 * med / bound:.0f}% / {100 * best / bound:.0f}%")


if __name__ == "__main__":
    main()
