"""KV slot allocation with prompt-prefix reuse. Pure Python: the model runner owns the tensors.

Each running sequence owns one slot: a contiguous block of `capacity` KV rows (adapter prefix
first, then its tokens) in the runner's cache tensor [slots, capacity, G, D]. Contiguity is the
point on CPU: a decode batch attends with one SDPA call over a view of the cache, where a paged
layout needs a gather of every sequence's KV per layer per step, which measured twice the cost of
the attention itself. The budget is therefore counted in slots (see EngineConfig.num_slots).

A released slot keeps its KV as a prompt cache entry keyed by (adapter id, version) plus the
token ids it holds. A new sequence with the same key whose prompt starts with some of those
tokens takes the slot over and skips their prefill. Keys never match across adapters or
adapter versions, so a prefix computed under one adapter is never reused under another.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Slot:
    index: int
    key: tuple | None = None  # cache key of the KV held; None when the slot holds nothing reusable
    tokens: list[int] = field(default_factory=list)  # tokens whose KV follows the prefix rows
    in_use: bool = False
    last_used: int = 0


@dataclass(slots=True)
class SlotGrant:
    slot: int
    reused: int  # leading tokens whose KV is already in the slot
    fill_prefix: bool  # the adapter prefix must be written into the slot's first rows


def common_prefix_len(a: list[int], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n - 1  # a[:lo] == b[:lo] holds and a[:n] != b[:n]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class SlotManager:
    def __init__(self, num_slots: int, capacity: int):
        if num_slots < 1:
            raise ValueError("need at least one KV slot")
        self.capacity = capacity
        self.slots = [Slot(i) for i in range(num_slots)]
        self._clock = 0
        self.num_reused_tokens = 0  # lifetime counters, for stats
        self.num_lookups = 0
        self.num_hits = 0

    @property
    def num_slots(self) -> int:
        return len(self.slots)

    @property
    def num_free(self) -> int:
        return sum(not s.in_use for s in self.slots)

    @property
    def num_cached(self) -> int:
        return sum(not s.in_use and s.key is not None for s in self.slots)

    def can_allocate(self, n: int = 1) -> bool:
        return self.num_free >= n

    def allocate(self, key: tuple, tokens: list[int], max_reuse: int) -> SlotGrant | None:
        """A slot for a sequence under `key` starting with `tokens`; None when every slot is in use.

        Takes over the free slot whose cached KV shares the longest token prefix (at most
        `max_reuse` tokens) under the same key; otherwise an empty slot, else the least recently
        used cache entry.
        """
        self.num_lookups += 1
        best, best_len = None, 0
        for s in self.slots:
            if not s.in_use and s.key == key and s.tokens:
                n = common_prefix_len(s.tokens, tokens, max_reuse)
                if n > best_len:
                    best, best_len = s, n
        if best is not None:
            self.num_hits += 1
            self.num_reused_tokens += best_len
            del best.tokens[best_len:]
            return self._take(best, key, best_len, fill_prefix=False)
        slot = self._victim()
        if slot is None:
            return None
        slot.tokens = []
        return self._take(slot, key, 0, fill_prefix=True)

    def allocate_empty(self, key: tuple) -> SlotGrant | None:
        """A slot whose rows will be copied from another (n > 1 siblings share one prefill)."""
        slot = self._victim()
        if slot is None:
            return None
        slot.tokens = []
        return self._take(slot, key, 0, fill_prefix=False)

    def release(self, index: int, tokens: list[int] | None = None) -> None:
        """Give a slot back; with `tokens` (those whose KV it holds) it stays a cache entry."""
        s = self.slots[index]
        assert s.in_use, f"slot {index} released twice"
        s.in_use = False
        self._clock += 1
        s.last_used = self._clock
        if tokens:
            s.tokens = list(tokens)
        else:
            s.key, s.tokens = None, []

    def clear_cache(self, key: tuple | None = None) -> None:
        """Forget cached KV (all of it, or one key's, e.g. when an adapter is unloaded)."""
        for s in self.slots:
            if not s.in_use and (key is None or s.key == key):
                s.key, s.tokens = None, []

    def _victim(self) -> Slot | None:
        free = [s for s in self.slots if not s.in_use]
        if not free:
            return None
        empty = [s for s in free if s.key is None]
        if empty:
            return empty[0]  # lowest index keeps the decode batch's slot range tight
        return min(free, key=lambda s: s.last_used)

    def _take(self, slot: Slot, key: tuple, reused: int, fill_prefix: bool) -> SlotGrant:
        slot.in_use = True
        slot.key = key
        self._clock += 1
        slot.last_used = self._clock
        return SlotGrant(slot.index, reused, fill_prefix)
