"""The synchronous engine: requests in, one batched step at a time, deltas out.

Single-threaded by design: server/engine.py runs it on its own thread and is the only caller.
Each step: schedule -> forward (model runner) -> sample -> stop rules and text -> deltas.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .adapter_files import AdapterVersion
from .block_manager import SlotManager
from .engine_config import EngineConfig
from .model_runner import ModelRunner
from .output import OutputProcessor
from .sampler import Sampler, make_generator
from .sampling import SamplingParams
from .scheduler import Scheduler
from .sequence import FinishReason, RequestOutput, Sequence

log = logging.getLogger(__name__)


@dataclass
class TargetSpec:
    """One (model, prompt) of a request, with the adapter version it runs under (None: the base)."""

    model: str
    prompt_ids: list[int]
    adapter: AdapterVersion | None = None
    fingerprint: str = ""


@dataclass
class Request:
    request_id: str
    seqs: list[Sequence]
    groups: list[list[Sequence]]
    arrival_time: float


@dataclass
class ModelCounters:
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    finished: int = 0
    aborted: int = 0
    ttft_sum_s: float = 0.0
    ttft_count: int = 0
    e2e_sum_s: float = 0.0


@dataclass(frozen=True)
class CoreSnapshot:
    """What other threads may read about the core: published whole after every engine iteration."""

    num_running: int = 0
    num_waiting: int = 0
    kv_used_tokens: int = 0
    kv_cached_tokens: int = 0
    prefix_cache_hits: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_reused_tokens: int = 0
    steps: int = 0
    per_model: dict[str, dict[str, float]] = field(default_factory=dict)


class EngineCore:
    def __init__(self, model: Any, tokenizer: Any, config: EngineConfig,
                 make_detokenizer: Callable[[Any], Any] | None = None):
        if make_detokenizer is None:
            from chatglm.tokenizer import IncrementalDetokenizer as make_detokenizer
        self.config = config
        self.tokenizer = tokenizer
        self.runner = ModelRunner(model, config)
        self.slots = SlotManager(self.runner.num_slots, config.slot_capacity)
        self.scheduler = Scheduler(config, self.slots)
        self.sampler = Sampler(tokenizer.eos_id, model.config.padded_vocab_size, config.device, config.seed)
        self.output = OutputProcessor(tokenizer, config.max_model_len, make_detokenizer)
        self.requests: dict[str, Request] = {}
        self.counters: dict[str, ModelCounters] = {}
        self.kv_used_tokens = 0
        self.num_steps = 0
        # per step: (decode tokens, prefill tokens, wall seconds, engine-thread CPU seconds)
        self.step_log: deque[tuple[int, int, float, float]] = deque(maxlen=4096)
        self._seq_ids = itertools.count()

    @property
    def num_slots(self) -> int:
        return self.slots.num_slots

    def make_request(self, request_id: str, targets: list[TargetSpec], params: SamplingParams) -> Request:
        now = time.monotonic()
        seqs, groups = [], []
        for t_idx, t in enumerate(targets):
            group = []
            for c in range(params.n):
                seq = Sequence(
                    seq_id=next(self._seq_ids), request_id=request_id, index=t_idx * params.n + c,
                    token_ids=list(t.prompt_ids), num_prompt=len(t.prompt_ids), params=params,
                    cache_key=t.adapter.cache_key if t.adapter else (), model=t.model,
                    prefix_len=t.adapter.pre_seq_len if t.adapter else 0, adapter=t.adapter, arrival_time=now, fingerprint=t.fingerprint,
                    generator=make_generator(params.seed, c, self.config.device) if params.seed is not None else None)
                self.output.start(seq)
                group.append(seq)
            seqs += group
            groups.append(group)
        return Request(request_id, seqs, groups, now)

    def add_request(self, req: Request) -> None:
        assert req.request_id not in self.requests, f"duplicate request id {req.request_id}"
        self.requests[req.request_id] = req
        for group in req.groups:
            c = self._counters(group[0].model)
            c.requests += 1
            c.prompt_tokens += group[0].num_prompt * len(group)
            self.scheduler.add(group)

    def abort(self, request_id: str) -> list[RequestOutput]:
        """Stop a request now; its KV slots are free for the next step. Returns its final deltas."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return []
        self.scheduler.abort(request_id)
        out = []
        for seq in req.seqs:
            if seq.finish_reason is FinishReason.ABORT:
                self._counters(seq.model).aborted += 1
                self.output.finish_text(seq)
                d = self.output.delta(seq, seq.num_prompt)
                if d is not None:
                    out.append(d)
        self._refresh_usage()
        return out

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[RequestOutput]:
        t0, c0 = time.perf_counter(), time.thread_time()
        plan = self.scheduler.schedule()
        if not plan:
            return []
        seqs = plan.sampling_seqs()
        batch = self.sampler.prepare(seqs)  # host-to-device copies before the forward is enqueued
        logits = self.runner.execute(plan)
        self.scheduler.update(plan)
        sampled = self.sampler(logits, batch)  # reads the ids back: the step's one host sync
        now = time.monotonic()
        for i, seq in enumerate(seqs):
            if seq.first_token_time is None:
                seq.first_token_time = now
                c = self._counters(seq.model)
                c.ttft_sum_s += now - seq.arrival_time
                c.ttft_count += 1
                c.cached_tokens += seq.num_cached
            done = self.output.append(seq, sampled.token_ids[i], sampled.logprobs[i], sampled.top_logprobs[i])
            if done is not None:
                self.scheduler.finish(seq, *done)
                c = self._counters(seq.model)
                c.finished += 1
                c.completion_tokens += seq.num_output
                c.e2e_sum_s += now - seq.arrival_time
        deltas = [d for seq in seqs if (d := self.output.delta(seq, seq.num_prompt)) is not None]
        for seq in seqs:
            if seq.is_finished:
                req = self.requests.get(seq.request_id)
                if req is not None and all(s.is_finished for s in req.seqs):
                    del self.requests[seq.request_id]
        self.num_steps += 1
        self._refresh_usage()
        self.step_log.append((len(plan.decode), sum(i.num_tokens for i in plan.prefill), time.perf_counter() - t0,
                              time.thread_time() - c0))
        return deltas

    def snapshot(self) -> CoreSnapshot:
        s = self.slots
        return CoreSnapshot(
            num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
            kv_used_tokens=self.kv_used_tokens,
            kv_cached_tokens=sum(len(x.tokens) for x in s.slots if not x.in_use and x.key is not None),
            prefix_cache_hits=s.num_hits, prefix_cache_queries=s.num_lookups,
            prefix_cache_reused_tokens=s.num_reused_tokens, steps=self.num_steps,
            per_model={m: dict(vars(c)) for m, c in self.counters.items()})

    def _refresh_usage(self) -> None:
        self.kv_used_tokens = sum(s.kv_rows for s in self.scheduler.running)

    def _counters(self, model: str) -> ModelCounters:
        c = self.counters.get(model)
        if c is None:
            c = self.counters[model] = ModelCounters()
        return c

    def fail_all(self) -> list[str]:
        """After a crash: drop every request; returns their ids."""
        ids = list(self.requests)
        for rid in ids:
            self.scheduler.abort(rid)
        self.requests.clear()
        return ids

    @torch.inference_mode()
    def warmup(self) -> None:
        """One tiny forward so first-request latency does not include lazy initialisation."""
        self.runner.model.transformer.rotary_pos_emb.table(self.runner.device)
