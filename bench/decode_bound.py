"""Single-stream decode of our serving engine on the chatglm2-6b shape vs the memory-bandwidth bound,
measured in the same process and run (issue 9's last acceptance line).

    python bench/decode_bound.py [--threads 2] [--steps 16] [--act auto|bf16|fp32] [--quantize-output-layer]

The int8 model is bench/quant.py's `build` (random THUDM-format int8 linears materialized in place,
~6.5 GB: check `free -g` first), put in the activation dtype the server would use (`--act auto`:
AsyncEngine's choice; the output layer and embedding follow it, as `load_model(dtype=...)` does).
One greedy request runs through the synchronous EngineCore (scheduler, slot KV, sampler, detokenizer;
no HTTP). Bound = read bandwidth (bench/quant.py's `bandwidth_gbs`: torch sum over 1 GiB, best of 7,
same threads) / bytes of weights read per token (every layer, final norm, output layer, one
embedding row). Bandwidth is measured before and after the decode; the bound uses the better one.
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

from bench.quant import bandwidth_gbs, build, bytes_per_token  # noqa: E402
from chatglm.quant_format import QuantMode  # noqa: E402
from chatglm.tokenizer import ChatGLMTokenizer  # noqa: E402
from server.engine_config import EngineConfig  # noqa: E402
from server.engine_core import EngineCore, TargetSpec  # noqa: E402
from server.sampling import SamplingParams  # noqa: E402

TOKENIZER = ROOT.parent / "shared" / "fixtures" / "chatglm2-tiny" / "model"


def act_dtype(act: str) -> torch.dtype:
    if act == "bf16":
        return torch.bfloat16
    if act == "fp32":
        return torch.float32
    from server.engine_config import auto_dtype

    return auto_dtype("int8", "cpu")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--act", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--quantize-output-layer", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    bw_before = bandwidth_gbs(args.threads)[0]
    dtype = act_dtype(args.act)
    t0 = time.perf_counter()
    model = build(QuantMode.INT8, include_output_layer=args.quantize_output_layer).to(dtype)
    build_s = time.perf_counter() - t0
    weight_gb = bytes_per_token(model) / 1e9
    tok = ChatGLMTokenizer.from_folder(TOKENIZER)
    core = EngineCore(model, tok, EngineConfig(dtype=dtype, max_num_seqs=1, max_model_len=256, max_prefix_len=1))
    ids = [tok.gmask_id, tok.sop_id] + [300 + 7 * i for i in range(args.prompt_len - 2)]
    params = SamplingParams(temperature=0.0, max_tokens=args.steps + 2, ignore_eos=True)
    core.add_request(core.make_request("r0", [TargetSpec("base", ids)], params))
    core.step()  # prefill
    steps = []
    while core.has_work():
        t = time.perf_counter()
        core.step()
        steps.append(time.perf_counter() - t)
    bw_after = bandwidth_gbs(args.threads)[0]
    bw = max(bw_before, bw_after)
    bound = bw / weight_gb
    med, best = 1 / statistics.median(steps), 1 / min(steps)
    print(f"torch {torch.__version__}, {args.threads} threads, activations {str(dtype).removeprefix('torch.')}, "
          f"output layer {'int8' if args.quantize_output_layer else str(dtype).removeprefix('torch.')}, "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}, build {build_s:.0f} s")
    print(f"read bandwidth {bw_before:.1f} GB/s before, {bw_after:.1f} GB/s after; weights read per token "
          f"{weight_gb:.2f} GB; bound {bound:.2f} tok/s")
    print(f"engine single-stream decode: {med:.2f} tok/s median, {best:.2f} best over {len(steps)} steps = "
          f"{100 * med / bound:.0f}% / {100 * best / bound:.0f}% of the bound (target >= 70%)")


if __name__ == "__main__":
    main()
