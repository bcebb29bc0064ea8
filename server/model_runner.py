"""Owns the model and the KV cache; turns a StepPlan into last-token logits.

The cache is one tensor [layers, 2, slots, capacity, G, D]. A sequence's slot starts with its
adapter's prefix K/V (copied once, when the sequence is admitted without a cache hit), then one
row per token. Every sequence of a step, whatever its adapter or prefix length, runs in the same
forward over packed tokens; only attention reads per-sequence rows (server/slot_attention.py).
"""
from __future__ import annotations

import logging
import time

import torch

from chatglm.huge_pages import move_to_huge_pages
from chatglm.model import ChatGLM

from .engine_config import EngineConfig
from .scheduler import StepPlan
from .sequence import Sequence
from .slot_attention import SlotAttention


log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model: ChatGLM, config: EngineConfig):
        self.model = model
        if config.huge_pages and torch.device(config.device).type == "cpu":
            t = time.perf_counter()
            moved = move_to_huge_pages(model)
            if moved:
                log.info("weights on huge pages: %.2f GB in %.1f s", moved / 1e9, time.perf_counter() - t)
        self.config = config
        c = model.config
        self.device = torch.device(config.device)
        self.kv_dtype = config.kv_dtype
        self.num_heads = c.num_attention_heads
        self.kv_shape = (c.num_layers, 2, c.num_kv_groups, c.kv_channels)
        esize = torch.empty(0, dtype=self.kv_dtype).element_size()
        self.bytes_per_token = c.num_layers * 2 * c.num_kv_groups * c.kv_channels * esize
        self.num_slots = config.num_slots(self.bytes_per_token)
        self.capacity = config.slot_capacity
        L, _, G, D = self.kv_shape
        self.num_tokens_computed = 0  # lifetime count of tokens run through the model
        self.kv = torch.zeros(L, 2, self.num_slots, self.capacity, G, D, dtype=self.kv_dtype,
                              device=self.device)  # [L, 2, slots, capacity, G, D]

    @property
    def kv_bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor:
        """Run one step; returns logits [R, V] (fp32), one row per plan.sampling_seqs()."""
        for seq in plan.prefix_fills:
            P = seq.prefix_len
            self.kv[:, :, seq.slot, :P] = seq.adapter.prefix.kv  # [L, 2, P, G, D], copied once per sequence
        ids: list[int] = []
        pos: list[int] = []
        sample_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        for item in plan.items:
            seq, a, n = item.seq, item.start, item.num_tokens
            ids += seq.token_ids[a:a + n]
            pos += range(a, a + n)
            if item.samples:
                sample_rows.append(len(ids) - 1)
                sample_seqs.append(seq)
        attn = SlotAttention.build(
            self.kv, self.num_heads,
            decode=[(i.seq.slot, i.seq.prefix_len + i.start) for i in plan.decode],
            prefill=[(i.seq.slot, i.seq.prefix_len + i.start, i.num_tokens) for i in plan.prefill])
        self.num_tokens_computed += len(ids)
        row_of = {id(s): r for r, s in enumerate(sample_seqs)}
        for parent, _ in plan.forks:  # n > 1: siblings sample from their parent's last position
            sample_rows.append(sample_rows[row_of[id(parent)]])
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)  # [N]
        positions = torch.tensor(pos, dtype=torch.long, device=self.device)  # [N]
        rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)  # [R]
        hidden = self.model.transformer.hidden_states(input_ids, positions, attn)  # [N, H]
        for parent, child in plan.forks:  # the parent's prompt KV is complete now
            self._copy_rows(parent.slot, child.slot, parent.prefix_len + parent.num_tokens)
        logits = self.model.compute_logits(hidden.index_select(0, rows))  # [R, V]
        return logits.float()

    def _copy_rows(self, src: int, dst: int, n: int) -> None:
        self.kv[:, :, dst, :n] = self.kv[:, :, src, :n]  # [L, 2, n, G, D]
