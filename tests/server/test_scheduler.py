"""Scheduler: continuous batching, token budget, limits, n > 1 forks, prefix reuse, abort."""
import itertools

from server.block_manager import SlotManager
from server.engine_config import EngineConfig
from server.sampling import SamplingParams
from server.scheduler import Scheduler
from server.sequence import FinishReason, Sequence, SequenceStatus

_ids = itertools.count()


def make(prompt, request_id="r", key=(), prefix_len=0, n=1):
    params = SamplingParams(n=n)
    return [Sequence(next(_ids), request_id, i, list(prompt), len(prompt), params, key, prefix_len) for i in range(n)]


def sched(num_slots=4, **kw):
    cfg = EngineConfig(max_model_len=64, max_prefix_len=8, **kw)
    return Scheduler(cfg, SlotManager(num_slots, cfg.slot_capacity))


def run_step(s, sample=7):
    """Schedule, pretend the forward ran, append a token to every sequence that samples."""
    plan = s.schedule()
    s.update(plan)
    for item in plan.items:
        if item.samples:
            item.seq.token_ids.append(sample)
    for _, child in plan.forks:
        child.token_ids.append(sample)
    return plan


def test_prefill_then_decode_in_one_loop():
    s = sched()
    a = make(range(10), "a")
    s.add(a)
    p1 = run_step(s)
    assert [(i.seq, i.start, i.num_tokens) for i in p1.prefill] == [(a[0], 0, 10)] and not p1.decode
    b = make(range(5), "b")
    s.add(b)
    p2 = run_step(s)
    assert [i.seq for i in p2.decode] == [a[0]] and [i.seq for i in p2.prefill] == [b[0]]
    assert p2.num_tokens == 1 + 5
    p3 = run_step(s)
    assert {i.seq.request_id for i in p3.decode} == {"a", "b"} and not p3.prefill
    assert [i.seq.slot for i in p3.decode] == sorted(i.seq.slot for i in p3.decode)


def test_token_budget_chunks_long_prompts():
    s = sched(max_num_batched_tokens=4)
    a = make(range(10), "a")
    s.add(a)
    chunks = []
    for _ in range(3):
        plan = s.schedule()
        chunks.append((plan.prefill[0].start, plan.prefill[0].num_tokens, plan.prefill[0].samples))
        s.update(plan)
    assert chunks == [(0, 4, False), (4, 4, False), (8, 2, True)]
    assert a[0].num_computed == 10


def test_limits_make_requests_wait_never_fail():
    s = sched(num_slots=2, max_num_seqs=8)
    seqs = [make([1, 2, 3], f"r{i}") for i in range(3)]
    for g in seqs:
        s.add(g)
    run_step(s)
    assert s.num_running == 2 and s.num_waiting == 1
    s.finish(seqs[0][0], FinishReason.STOP)
    plan = run_step(s)
    assert seqs[2][0] in [i.seq for i in plan.items] and s.num_waiting == 0
    s2 = sched(num_slots=4, max_num_seqs=1)
    for g in seqs[:2]:
        for q in g:
            q.status, q.num_computed = SequenceStatus.WAITING, 0
        s2.add(g)
    run_step(s2)
    assert s2.num_running == 1 and s2.num_waiting == 1


def test_n_choices_share_one_prefill():
    s = sched(num_slots=4)
    group = make(range(6), "r", n=3)
    s.add(group)
    plan = run_step(s, sample=11)
    assert [i.seq for i in plan.items] == [group[0]]  # only the first choice is computed
    assert plan.forks == [(group[0], group[1]), (group[0], group[2])]
    assert len({q.slot for q in group}) == 3
    assert all(q.num_computed == 6 and q.token_ids[-1] == 11 and q.parent is None for q in group)
    plan = run_step(s)
    assert sorted(i.seq.index for i in plan.decode) == [0, 1, 2]


def test_group_waits_until_all_its_slots_are_free():
    s = sched(num_slots=3)
    s.add(make([1, 2], "first"))
    run_step(s)
    s.add(make([1, 2], "three", n=3))
    run_step(s)
    assert s.num_waiting == 3 and s.num_running == 1


def test_prefix_cache_reuse_and_its_key():
    s = sched(num_slots=2)
    first = make([1, 2, 3, 4], "t1", key=(1, "v"), prefix_len=3)[0]
    s.add([first])
    plan = run_step(s)
    assert plan.prefix_fills == [first]
    s.finish(first, FinishReason.STOP)  # holds KV of 1 2 3 4 (the sampled token has none yet)
    other = make([1, 2, 3, 4, 5, 6], "other-adapter", key=(2, "v"), prefix_len=3)[0]
    again = make([1, 2, 3, 4, 7, 5, 6], "t2", key=(1, "v"), prefix_len=3)[0]
    s.add([other])
    s.add([again])
    plan = run_step(s)
    assert other.num_cached == 0 and other in plan.prefix_fills
    assert again.slot == first.slot and again.num_cached == 4 and again not in plan.prefix_fills
    assert [(i.start, i.num_tokens) for i in plan.prefill if i.seq is again] == [(4, 3)]


def test_fully_cached_prompt_runs_as_a_decode_token():
    s = sched(num_slots=1)
    a = make([1, 2, 3], "a")[0]
    s.add([a])
    run_step(s)
    s.finish(a, FinishReason.STOP)
    b = make([1, 2, 3], "b")[0]
    s.add([b])
    plan = run_step(s)
    assert [(i.seq, i.start) for i in plan.decode] == [(b, 2)] and b.num_cached == 2


def test_abort_frees_slots_immediately():
    s = sched(num_slots=2)
    g = make(range(4), "x", n=2)
    s.add(g)
    s.add(make([1], "queued"))
    assert s.slots.num_free == 2
    run_step(s)
    assert s.slots.num_free == 0
    hit = s.abort("x")
    assert {q.index for q in hit} == {0, 1}
    assert all(q.finish_reason is FinishReason.ABORT and q.is_finished for q in hit)
    assert s.slots.num_free == 2 and s.num_running == 0
    assert s.abort("queued")[0].finish_reason is FinishReason.ABORT and not s.has_work()


def test_abort_before_fork_finishes_the_waiting_siblings():
    s = sched(num_slots=3, max_num_batched_tokens=2)
    g = make(range(5), "x", n=3)
    s.add(g)
    run_step(s)  # the first chunk only: the siblings still wait for the prompt's KV
    assert g[1].parent is g[0]
    s.finish(g[0], FinishReason.ABORT)
    assert all(q.is_finished for q in g) and s.slots.num_free == 3 and not s.children
