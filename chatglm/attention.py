"""Attention over a padded batch with a dense per-row KV cache (prefix K/V first, then tokens).

The model computes rotated q/k/v and hands them to an attention backend: a callable
`backend(layer, q, k, v) -> out`. This module holds the padded-batch backend used by the public
API, `chat`, generation and training; the serving engine brings its own backend.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .config import ChatGLMConfig
from .prefix import PrefixKV


# cuDNN's attention plans a graph for every new key length, i.e. every decode step: measured on an
# H200 at ~1.7 ms of CPU time per call, 60 % of an eager decode step. The other CUDA kernels don't.
_CUDA_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
         enable_gqa: bool = False) -> torch.Tensor:
    """F.scaled_dot_product_attention, without the cuDNN backend on CUDA."""
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)
    with sdpa_kernel(_CUDA_SDPA):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)


class AttentionBackend(Protocol):
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


class DenseKVCache:
    """Per-layer K/V of a padded batch: k[l], v[l] are [B, S, G, D]; key_mask [B, S] is True on real slots.

    Prefix K/V (P-Tuning v2) sit in the first slots, un-rotated; they hold no position, so
    `next_pos` (the position of each row's next token) starts at 0 after them.
    """

    def __init__(self, num_layers: int):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.key_mask: torch.Tensor | None = None  # [B, S] bool
        self.next_pos: torch.Tensor | None = None  # [B] long

    @property
    def length(self) -> int:
        return 0 if self.key_mask is None else self.key_mask.shape[1]

    @classmethod
    def from_prefix(cls, config: ChatGLMConfig, batch: int, prefix: PrefixKV | Sequence[PrefixKV | None],
                    dtype: torch.dtype, device: torch.device) -> "DenseKVCache":
        """Start a cache holding each row's prefix K/V; rows with shorter (or no) prefixes are masked."""
        cache = cls(config.num_layers)
        if isinstance(prefix, PrefixKV):
            kv = prefix.kv.to(dtype=dtype, device=device)  # [L, 2, P, G, D]
            kv = kv.unsqueeze(2).expand(-1, -1, batch, -1, -1, -1)  # [L, 2, B, P, G, D]
            mask = torch.ones(batch, prefix.pre_seq_len, dtype=torch.bool, device=device)
        else:
            if len(prefix) != batch:
                raise ValueError(f"got {len(prefix)} prefixes for a batch of {batch}")
            P = max((p.pre_seq_len for p in prefix if p is not None), default=0)
            G, D = config.num_kv_groups, config.kv_channels
            kv = torch.zeros(config.num_layers, 2, batch, P, G, D, dtype=dtype, device=device)
            mask = torch.zeros(batch, P, dtype=torch.bool, device=device)
            rows = []
            for b, p in enumerate(prefix):
                if p is None:
                    rows.append(kv[:, :, b])
                    continue
                n = p.pre_seq_len  # right-align; key order does not matter to attention
                pk = p.kv.to(dtype=dtype, device=device)
                rows.append(torch.cat([kv[:, :, b, : P - n], pk], dim=2))
                mask[b, P - n:] = True
            kv = torch.stack(rows, dim=2)  # keeps autograd to trainable prefixes
        for i in range(config.num_layers):
            cache.k[i], cache.v[i] = kv[i, 0], kv[i, 1]
        cache.key_mask = mask
        cache.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        return cache


class DenseAttention:
    """Backend for one forward over new tokens [B, T] against a DenseKVCache.

    Masking follows THUDM: causal over the new tokens, padded keys hidden, and padded query
    rows allowed to see every key so they never produce NaN (their outputs are ignored).
    """

    def __init__(self, cache: DenseKVCache, new_mask: torch.Tensor, store: bool):
        self.cache = cache
        self.new_mask = new_mask  # [B, T] bool
        self.store = store
        self._mask: torch.Tensor | None = None
        self._new_k: list[torch.Tensor | None] = [None] * len(cache.k)
        self._new_v: list[torch.Tensor | None] = [None] * len(cache.v)

    def _build_mask(self, device: torch.device) -> torch.Tensor:
        B, T = self.new_mask.shape
        past = self.cache.length
        key_mask = self.new_mask if self.cache.key_mask is None else torch.cat([self.cache.key_mask, self.new_mask], 1)
        q_idx = torch.arange(T, device=device)[:, None] + past
        k_idx = torch.arange(past + T, device=device)[None, :]
        keep = (k_idx <= q_idx)[None] & key_mask[:, None, :]  # [B, T, S]
        keep = keep | ~self.new_mask[:, :, None]
        return keep[:, None]  # [B, 1, T, S]

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q [B, T, H, D]; k, v [B, T, G, D]
        past_k, past_v = self.cache.k[layer], self.cache.v[layer]
        if past_k is not None:
            k = torch.cat([past_k.to(k.dtype), k], dim=1)  # [B, S, G, D]
            v = torch.cat([past_v.to(v.dtype), v], dim=1)
        if self.store:
            self._new_k[layer], self._new_v[layer] = k, v
        if self._mask is None:
            self._mask = self._build_mask(q.device)
        out = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # [B, H, T, D], [B, G, S, D]
                   self._mask, enable_gqa=True)
        return out.transpose(1, 2)  # [B, T, H, D]

    def commit(self) -> None:
        """After all layers ran: make the new K/V part of the cache."""
        if not self.store:
            return
        c = self.cache
        c.k, c.v = self._new_k, self._new_v
        c.key_mask = self.new_mask if c.key_mask is None else torch.cat([c.key_mask, self.new_mask], 1)
        added = self.new_mask.sum(-1)
        c.next_pos = added if c.next_pos is None else c.next_pos + added
