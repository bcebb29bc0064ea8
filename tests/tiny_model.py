"""Tiny random ChatGLM2 models for tests: built in-process, no downloads."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from chatglm.config import ChatGLMConfig
from chatglm.model import ChatGLM
from chatglm.prefix import PrefixEncoder


def tiny_config(**overrides) -> ChatGLMConfig:
    base = dict(num_layers=2, padded_vocab_size=3072, hidden_size=64, ffn_hidden_size=96, kv_channels=16,
                num_attention_heads=4, seq_length=512, multi_query_attention=True, multi_query_group_num=2,
                add_qkv_bias=True, torch_dtype="float32")
    base.update(overrides)
    return ChatGLMConfig(**base)


def tiny_model(config: ChatGLMConfig | None = None, seed: int = 0, std: float = 0.2) -> ChatGLM:
    config = config or tiny_config()
    g = torch.Generator().manual_seed(seed)
    model = ChatGLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g) * (5 if "word_embeddings" in name else 1))
    return model.eval()


def tiny_prefix_encoder(config: ChatGLMConfig, pre_seq_len: int, projection: bool = False, seed: int = 1) -> PrefixEncoder:
    g = torch.Generator().manual_seed(seed)
    enc = PrefixEncoder(config, pre_seq_len, projection)
    with torch.no_grad():
        for p in enc.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 if p.dim() == 2 and p.shape[0] == pre_seq_len else 0.1))
    return enc


def copy_tokenizer(fixture_dir: Path, folder: Path) -> None:
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(fixture_dir / "model" / name, folder / name)
