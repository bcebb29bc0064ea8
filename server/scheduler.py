"""Continuous batching: which sequences run in the next step and with how many tokens. Pure Python.

A step holds every running sequence that has one token to compute (decode), then prefill chunks
of admitted sequences, all within `max_num_batched_tokens`. Waiting requests are admitted first
come, first served while sequences and KV slots allow; a request that does not fit waits (a
running sequence never needs more KV than its slot, so nothing is ever preempted or out of memory).
The n > 1 choices of a request are admitted together: the first one prefills, the others copy its
KV and sample from its logits in the step where its prompt completes.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import SlotManager
from .engine_config import EngineConfig
from .sequence import FinishReason, Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    start: int  # index of the first token computed in this step
    num_tokens: int

    @property
    def samples(self) -> bool:
        """This chunk reaches the sequence's last token, so the step samples its next one."""
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclass
class StepPlan:
    decode: list[ScheduledSeq] = field(default_factory=list)  # one token each, ordered by slot
    prefill: list[ScheduledSeq] = field(default_factory=list)
    prefix_fills: list[Sequence] = field(default_factory=list)  # write the adapter prefix into the slot first
    forks: list[tuple[Sequence, Sequence]] = field(default_factory=list)  # (parent, child) after the forward

    @property
    def items(self) -> list[ScheduledSeq]:
        return self.decode + self.prefill

    def sampling_seqs(self) -> list[Sequence]:
        """The sequences that get a token this step, in the order of the runner's logits rows."""
        return [i.seq for i in self.items if i.samples] + [child for _, child in self.forks]

    @property
    def num_tokens(self) -> int:
        return sum(i.num_tokens for i in self.decode) + sum(i.num_tokens for i in self.prefill)

    def __bool__(self) -> bool:
        return bool(self.decode or self.prefill)


class Scheduler:
    def __init__(self, config: EngineConfig, slots: SlotManager):
        self.config = config
        self.slots = slots
        self.waiting: deque[list[Sequence]] = deque()  # groups: the choices of one target of a request
        self.running: list[Sequence] = []
        self.children: dict[int, list[Sequence]] = {}  # parent seq_id -> siblings waiting for its prefill

    @property
    def num_waiting(self) -> int:
        return sum(len(g) for g in self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, group: list[Sequence]) -> None:
        assert group and all(s.status is SequenceStatus.WAITING for s in group)
        assert len(group) <= min(self.config.max_num_seqs, self.slots.num_slots), "group can never be admitted"
        self.waiting.append(group)

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.config.max_num_batched_tokens
        waiting_children = {c.seq_id for cs in self.children.values() for c in cs}
        for seq in self.running:
            pending = seq.num_tokens - seq.num_computed
            if seq.seq_id in waiting_children or pending != 1 or budget == 0:
                continue
            plan.decode.append(ScheduledSeq(seq, seq.num_computed, 1))
            budget -= 1
        plan.decode.sort(key=lambda i: i.seq.slot)
        for seq in self.running:
            pending = seq.num_tokens - seq.num_computed
            if seq.seq_id in waiting_children or pending <= 1 or budget == 0:
                continue
            n = min(pending, budget)
            plan.prefill.append(ScheduledSeq(seq, seq.num_computed, n))
            budget -= n
        while self.waiting and budget > 0:
            used = self._admit(self.waiting[0], plan, budget)
            if not used:
                break
            budget -= used
            group = self.waiting.popleft()
            if len(group) > 1:
                self.children[group[0].seq_id] = group[1:]
        for item in plan.items:
            if item.samples and item.seq.seq_id in self.children:
                plan.forks.extend((item.seq, c) for c in self.children[item.seq.seq_id])
        return plan

    def _admit(self, group: list[Sequence], plan: StepPlan, budget: int) -> int:
        """Give the group slots and schedule its first chunk; returns the tokens scheduled (0: it waits)."""
        if len(self.running) + len(group) > self.config.max_num_seqs or not self.slots.can_allocate(len(group)):
            return 0
        first = group[0]
        grant = self.slots.allocate(first.cache_key, first.token_ids, max_reuse=first.num_prompt - 1)
        assert grant is not None
        first.slot, first.num_computed, first.num_cached = grant.slot, grant.reused, grant.reused
        for child in group[1:]:
            child.slot = self.slots.allocate_empty(child.cache_key).slot
            child.parent = first
        for seq in group:
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        if grant.fill_prefix and first.prefix_len:
            plan.prefix_fills.append(first)
        pending = first.num_tokens - first.num_computed
        target = plan.decode if pending == 1 else plan.prefill
        # a fully cached prompt has one token left: it runs like a decode token
        n = min(pending, budget)
        target.append(ScheduledSeq(first, first.num_computed, n))
        if target is plan.decode:
            plan.decode.sort(key=lambda i: i.seq.slot)
        return n

    def update(self, plan: StepPlan) -> None:
        """After the forward: the scheduled tokens have KV; forked siblings now hold the prompt's KV."""
        for item in plan.items:
            item.seq.num_computed = item.start + item.num_tokens
        for parent, child in plan.forks:
            child.num_computed = parent.num_computed
            child.parent = None
            self.children.pop(parent.seq_id, None)

    def finish(self, seq: Sequence, reason: FinishReason, stop_reason: str | int | None = None) -> None:
        if seq.status is SequenceStatus.FINISHED:
            return
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            # the slot stays a prompt cache entry for the tokens that have KV (not siblings mid-fork)
            cacheable = seq.parent is None and seq.num_computed > 0
            self.slots.release(seq.slot, seq.token_ids[:seq.num_computed] if cacheable else None)
            if seq.parent is not None:
                self.children[seq.parent.seq_id].remove(seq)
            for child in self.children.pop(seq.seq_id, []):
                child.parent = None  # siblings that never got the prompt's KV cannot go on alone
                self.finish(child, reason, stop_reason)
        seq.status = SequenceStatus.FINISHED

    def abort(self, request_id: str) -> list[Sequence]:
        """Finish every sequence of the request with ABORT; their slots are free for the next step."""
        hit = [s for g in self.waiting for s in g if s.request_id == request_id]
        self.waiting = deque(g for g in self.waiting if g[0].request_id != request_id)
        for seq in hit:
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = FinishReason.ABORT
        for seq in [s for s in self.running if s.request_id == request_id]:
            self.finish(seq, FinishReason.ABORT)
            hit.append(seq)
        return hit
