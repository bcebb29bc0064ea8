"""Attention backend for the engine: packed tokens [N] of many sequences against per-sequence KV slots.

The model hands every layer's rotated q [N, Hq, D] and new k, v [N, G, D] to `SlotAttention`,
which writes k/v into the slot rows and attends. Tokens come packed as decode tokens first (one per
sequence, ordered by slot), then prefill chunks. Decode tokens attend in one SDPA call over the
contiguous slot range they span, read in place (rows of other slots in that range are masked and
ignored); only when that range is mostly other slots are the decode rows gathered instead. Each
prefill chunk attends with its own call. The heads that share a KV group are folded into query
rows ([G, hq*T, D]), so SDPA needs no GQA expansion. Adapter prefix K/V sit in each slot's first
rows, un-rotated, and carry no position (ChatGLM2's P-Tuning v2 convention).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from chatglm import fused_ops
from chatglm.attention import sdpa


class DecodeLayout(Enum):
    DENSE = "dense"  # the decode slots are consecutive: attend over a view
    RANGE = "range"  # a view over the slot range, holes masked (cheaper than a copy while holes are few)
    GATHER = "gather"  # mostly holes: copy the decode slots' rows out first


@dataclass
class PrefillChunk:
    start: int  # token range [start, end) in the packed batch
    end: int
    slot: int
    ctx: int  # KV rows visible to the chunk's last token: prefix + earlier tokens + the chunk
    mask: torch.Tensor  # [hq * T, ctx] bool, True = attend


class SlotAttention:
    """Per-step metadata plus the layer call. `kv` is the runner's cache [L, 2, slots, capacity, G, D]."""

    def __init__(self, kv: torch.Tensor, num_heads: int, slot_ids: torch.Tensor, rows: torch.Tensor,
                 num_decode: int, layout: DecodeLayout, decode_lo: int, decode_index: torch.Tensor | None,
                 decode_mask: torch.Tensor | None, prefills: list[PrefillChunk]):
        self.kv = kv
        self.num_heads = num_heads
        self.slot_ids = slot_ids  # [N] slot of each token
        self.rows = rows  # [N] KV row of each token within its slot
        self.num_decode = num_decode
        self.layout = layout
        self.decode_lo = decode_lo
        self.decode_index = decode_index  # [num_decode]: RANGE, row in the slot range; GATHER, the slot
        self.decode_mask = decode_mask  # [R, 1, 1, S] bool (R: rows of the range, or num_decode)
        self.prefills = prefills

    @classmethod
    def build(cls, kv: torch.Tensor, num_heads: int, decode: list[tuple[int, int]],
              prefill: list[tuple[int, int, int]]) -> "SlotAttention":
        """decode: (slot, row of the new token); prefill: (slot, first row, number of tokens)."""
        dev = kv.device
        G = kv.shape[-2]
        hq = num_heads // G
        slots = [s for s, _ in decode]
        rows = [r for _, r in decode]
        for slot, first, n in prefill:
            slots += [slot] * n
            rows += range(first, first + n)
        nd = len(decode)
        layout, lo, index, mask = DecodeLayout.DENSE, 0, None, None
        if nd:
            lo = min(slots[:nd])
            R = max(slots[:nd]) - lo + 1
            layout = DecodeLayout.DENSE if R == nd else DecodeLayout.RANGE if R <= 2 * nd else DecodeLayout.GATHER
            if layout is DecodeLayout.GATHER:
                lens = [r + 1 for _, r in decode]
                index = torch.tensor(slots[:nd], device=dev)  # [nd]
            else:
                lens = [1] * R  # rows not decoding in this step see one row; their output is dropped
                for s, r in decode:
                    lens[s - lo] = r + 1
                if layout is DecodeLayout.RANGE:
                    index = torch.tensor([s - lo for s in slots[:nd]], device=dev)  # [nd]
            S = max(lens)
            lens_t = torch.tensor(lens, device=dev)
            mask = (torch.arange(S, device=dev)[None] < lens_t[:, None])[:, None, None]  # [R, 1, 1, S]
        chunks = []
        t = nd
        for slot, first, n in prefill:
            ctx = first + n
            q_row = torch.arange(first, ctx, device=dev)[:, None]  # [T, 1]
            causal = torch.arange(ctx, device=dev)[None] <= q_row  # [T, ctx]
            chunks.append(PrefillChunk(t, t + n, slot, ctx, causal.repeat(hq, 1)))  # [hq*T, ctx]
            t += n
        return cls(kv, num_heads, torch.tensor(slots, device=dev), torch.tensor(rows, device=dev),
                   nd, layout, lo, index, mask, chunks)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q [N, Hq, D]; k, v [N, G, D] (rotated)
        k_cache, v_cache = self.kv[layer, 0], self.kv[layer, 1]  # [slots, capacity, G, D]
        if self.num_decode and not self.prefills and k_cache.dtype == q.dtype and fused_ops.use_fused(q, k_cache):
            # one C++ call: KV writes and attention, whatever the slots' layout
            return fused_ops.decode_attention_(k_cache, v_cache, q, k, v, self.slot_ids, self.rows)
        k_cache[self.slot_ids, self.rows] = k.to(k_cache.dtype)
        v_cache[self.slot_ids, self.rows] = v.to(v_cache.dtype)
        N, Hq, D = q.shape
        G = k_cache.shape[-2]
        hq = Hq // G
        qc = q.to(k_cache.dtype)
        nd = self.num_decode
        if nd and not self.prefills and self.layout is not DecodeLayout.RANGE:
            return self._decode(qc[:nd], k_cache, v_cache, G, hq).to(q.dtype)
        out = torch.empty_like(qc)  # [N, Hq, D]
        if nd:
            out[:nd] = self._decode(qc[:nd], k_cache, v_cache, G, hq)
        for c in self.prefills:
            T = c.end - c.start
            qp = qc[c.start:c.end].view(T, G, hq, D).permute(1, 2, 0, 3).reshape(1, G, hq * T, D)
            kp = k_cache[c.slot, :c.ctx].transpose(0, 1)[None]  # [1, G, ctx, D]
            vp = v_cache[c.slot, :c.ctx].transpose(0, 1)[None]
            o = sdpa(qp, kp, vp, c.mask)  # [1, G, hq*T, D]
            out[c.start:c.end] = o.view(G, hq, T, D).permute(2, 0, 1, 3).reshape(T, Hq, D)
        return out.to(q.dtype)

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, G: int, hq: int) -> torch.Tensor:
        nd, Hq, D = q.shape
        R, S = self.decode_mask.shape[0], self.decode_mask.shape[-1]
        qd = q.view(nd, G, hq, D)
        if self.layout is DecodeLayout.GATHER:
            kd = k_cache[:, :S].index_select(0, self.decode_index).transpose(1, 2)  # [nd, G, S, D], a copy
            vd = v_cache[:, :S].index_select(0, self.decode_index).transpose(1, 2)
        else:
            lo = self.decode_lo
            kd = k_cache[lo:lo + R, :S].transpose(1, 2)  # [R, G, S, D], a view: no copy
            vd = v_cache[lo:lo + R, :S].transpose(1, 2)
        if self.layout is DecodeLayout.RANGE:
            qd = q.new_zeros(R, G, hq, D).index_copy_(0, self.decode_index, qd)  # [R, G, hq, D]
        o = sdpa(qd, kd, vd, self.decode_mask)  # [R, G, hq, D]
        if self.layout is DecodeLayout.RANGE:
            o = o.index_select(0, self.decode_index)
        return o.reshape(nd, Hq, D)
