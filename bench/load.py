"""Load time and peak RSS of a chatglm2-6b-shaped random checkpoint in the sharded `.bin` layout.

    python bench/load.py [--dir /tmp/chatglm2-6b-random] [--dtype bfloat16] [--quantize int8]

The checkpoint (fp16, 7 shards + index, as published) is created once and reused. Each load runs in
a fresh subprocess so its peak RSS (ru_maxrss) is the loader's alone.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from chatglm.config import ChatGLMConfig

SHAPE_6B = dict(num_layers=28, padded_vocab_size=65024, hidden_size=4096, ffn_hidden_size=13696, kv_channels=128,
                num_attention_heads=32, seq_length=32768, multi_query_attention=True, multi_query_group_num=2,
                add_qkv_bias=True, torch_dtype="float16")


def shapes(cfg: ChatGLMConfig) -> dict[str, tuple[int, ...]]:
    h, qkv = cfg.hidden_size, (cfg.num_attention_heads + 2 * cfg.num_kv_groups) * cfg.kv_channels
    out = {"transformer.embedding.word_embeddings.weight": (cfg.padded_vocab_size, h),
           "transformer.rotary_pos_emb.inv_freq": (cfg.kv_channels // 4,)}
    for i in range(cfg.num_layers):
        p = f"transformer.encoder.layers.{i}."
        out.update({p + "input_layernorm.weight": (h,), p + "self_attention.query_key_value.weight": (qkv, h),
                    p + "self_attention.query_key_value.bias": (qkv,), p + "self_attention.dense.weight": (h, h),
                    p + "post_attention_layernorm.weight": (h,), p + "mlp.dense_h_to_4h.weight": (2 * cfg.ffn_hidden_size, h),
                    p + "mlp.dense_4h_to_h.weight": (h, cfg.ffn_hidden_size)})
    out["transformer.encoder.final_layernorm.weight"] = (h,)
    out["transformer.output_layer.weight"] = (cfg.padded_vocab_size, h)
    return out


def create(folder: Path, num_shards: int = 7) -> None:
    cfg = ChatGLMConfig(**SHAPE_6B)
    folder.mkdir(parents=True, exist_ok=True)
    cfg.save(folder)
    all_shapes = shapes(cfg)
    total = sum(torch.Size(s).numel() * 2 for s in all_shapes.values())
    per_shard, shard, size, weight_map, n = total / num_shards, {}, 0, {}, 1
    g = torch.Generator().manual_seed(0)

    def flush(shard: dict, n: int) -> None:
        name = f"pytorch_model-{n:05d}-of-{num_shards:05d}.bin"
        torch.save(shard, folder / name)
        weight_map.update(dict.fromkeys(shard, name))

    for key, s in all_shapes.items():
        shard[key] = (torch.randn(s, generator=g, dtype=torch.float32) * 0.02).half()
        size += shard[key].numel() * 2
        if size >= per_shard * n and n < num_shards:
            flush(shard, n)
            shard, n = {}, n + 1
    flush(shard, n)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))


def child(folder: str, dtype: str, quantize: str | None) -> None:
    import chatglm

    t = time.perf_counter()
    model = chatglm.load_model(folder, dtype=getattr(torch, dtype), quantize=quantize)
    seconds = time.perf_counter() - t
    weight_bytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "peak_rss": peak, "weight_bytes": weight_bytes}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/tmp/chatglm2-6b-random")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quantize", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    folder = Path(args.dir)
    if args.child:
        return child(args.dir, args.dtype, args.quantize)
    if not (folder / "pytorch_model.bin.index.json").is_file():
        t = time.perf_counter()
        create(folder)
        print(f"created {folder} in {time.perf_counter() - t:.0f} s")
    cmd = [sys.executable, __file__, "--child", "--dir", args.dir, "--dtype", args.dtype]
    if args.quantize:
        cmd += ["--quantize", args.quantize]
    r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    bf16_bytes = sum(torch.Size(s).numel() * 2 for k, s in shapes(ChatGLMConfig(**SHAPE_6B)).items()
                     if not k.endswith("inv_freq"))
    print(f"load {args.dtype}{' ' + args.quantize if args.quantize else ''}: {r['seconds']:.1f} s, "
          f"peak RSS {r['peak_rss'] / 1e9:.2f} GB, resident weights {r['weight_bytes'] / 1e9:.2f} GB, "
          f"peak / bf16 weight bytes ({bf16_bytes / 1e9:.2f} GB) = {r['peak_rss'] / bf16_bytes:.3f}")


if __name__ == "__main__":
    main()
