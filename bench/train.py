"""P-Tuning v2 training throughput and peak memory on a mid-size ChatGLM2, bf16 or int8/int4 base.

    python bench/train.py [--configs bf16,bf16-int4,fp32-int4] [--steps 3] [--batch 1] [--seq 193]
                          [--pre-seq-len 128] [--layers 24] [--device cpu|cuda] [--threads 2]

The model is the real ChatGLM (hidden 1024, 24 layers, 8 heads, 2 KV groups, ffn 3424, vocab 65024)
with random weights, built on meta and materialized in its final dtype (quantized linears straight
from a per-layer random float weight), wrapped in training.model_setup.PTuningModel exactly as
`python -m training.run` trains it: frozen base, fp32 prefix encoder, prefix dropout, gradient
checkpointing, fp32 loss, AdamW on the prefix. Each config runs in its own subprocess so its peak
memory (CPU: VmHWM; CUDA: max_memory_allocated) is its own. tokens/s counts every token of the
[batch, seq] rows (THUDM pads train rows to max_source + max_target + 1 = 193); on a shared CPU,
tokens per CPU-second (process time of all threads) is the number that survives contention.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from torch import nn

from chatglm.config import ChatGLMConfig
from chatglm.model import ChatGLM
from chatglm.prefix import PrefixEncoder
from chatglm.quantize import QuantizedLinear, QuantMode, swap_in_empty_quantized
from training.model_setup import PTuningModel

MID = dict(num_layers=24, padded_vocab_size=65024, hidden_size=1024, ffn_hidden_size=3424, kv_channels=128,
           num_attention_heads=8, seq_length=2048, multi_query_attention=True, multi_query_group_num=2,
           add_qkv_bias=True)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def peak_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status["VmHWM"].split()[0]) * 1024 / 1e9


@torch.no_grad()
def build(layers: int, dtype: torch.dtype, mode: QuantMode, device: torch.device) -> ChatGLM:
    config = ChatGLMConfig(**{**MID, "num_layers": layers})
    with torch.device("meta"):
        model = ChatGLM(config)
    if mode is not QuantMode.NONE:
        swap_in_empty_quantized(model, mode, dtype=dtype, device="meta")
    g = torch.Generator(device=device).manual_seed(0)
    for module in model.modules():
        if isinstance(module, QuantizedLinear):  # quantize a random float weight, one layer at a time
            w = torch.empty(module.out_features, module.in_features, dtype=dtype, device=device).normal_(0, 0.02, generator=g)
            module.set_float_weight(w)
            module.bias = nn.Parameter(torch.zeros(module.out_features, dtype=dtype, device=device), requires_grad=False)
            continue
        for name, p in list(module.named_parameters(recurse=False)):
            t = torch.empty(p.shape, dtype=dtype, device=device)
            t.fill_(1.0) if name == "weight" and p.dim() == 1 else t.normal_(0, 0.02, generator=g)
            setattr(module, name, nn.Parameter(t, requires_grad=False))
    return model.eval()


def run_one(name: str, args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    dtype_name, _, quant = name.partition("-")
    device = torch.device(args.device)
    mode = QuantMode.parse(quant or None)
    t0 = time.perf_counter()
    base = build(args.layers, DTYPES[dtype_name], mode, device)
    torch.manual_seed(0)
    model = PTuningModel(base, PrefixEncoder(base.config, args.pre_seq_len).to(device))
    base.transformer.gradient_checkpointing = not args.no_checkpointing
    model.train()
    build_s = time.perf_counter() - t0
    opt = torch.optim.AdamW(model.prefix_encoder.parameters(), lr=2e-2)
    ids = torch.randint(5, 64000, (args.batch, args.seq), device=device)
    labels = ids.clone()
    labels[:, : args.seq // 3] = -100  # prompt positions carry no loss, as THUDM's labels
    times, cpu = [], []
    for _ in range(args.steps + 1):  # the first step warms up (kernel repacking, allocator)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t, c = time.perf_counter(), time.process_time()
        loss = model(ids, labels)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    step = sorted(times[1:])[len(times[1:]) // 2]
    step_cpu = sorted(cpu[1:])[len(cpu[1:]) // 2]
    return {"config": name, "layers": args.layers, "batch": args.batch, "seq": args.seq,
            "pre_seq_len": args.pre_seq_len, "checkpointing": not args.no_checkpointing,
            "step_s_median": round(step, 3), "tokens_per_s": round(args.batch * args.seq / step, 2),
            "step_cpu_s": round(step_cpu, 2), "tokens_per_cpu_s": round(args.batch * args.seq / step_cpu, 2),
            "peak_gb": round(peak_gb(device), 3), "build_s": round(build_s, 1), "loss": round(loss.item(), 3),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "base_weight_gb": round(sum(p.numel() * p.element_size() for p in base.parameters()) / 1e9, 3),
            "device": str(device),
            "threads": args.threads}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="bf16,bf16-int4,fp32-int4", help="dtype[-int8|-int4], comma separated")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=193)
    p.add_argument("--pre-seq-len", type=int, default=128)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args)))
        return
    rest = sys.argv[1:]
    if "--configs" in rest:  # the children get every other flag unchanged
        i = rest.index("--configs")
        rest = rest[:i] + rest[i + 2:]
    for name in args.configs.split(","):
        cmd = [sys.executable, __file__, "--child", name, *rest]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{name}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
