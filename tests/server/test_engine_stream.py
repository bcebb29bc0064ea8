"""Engine streaming behaviour: text, stop rules, prompt reuse, limits, errors, shutdown."""
import asyncio
import time

import pytest
import torch

from server.client import Target
from server.errors import ContextLengthExceeded, InvalidRequest, ModelNotFound, Overloaded
from server.sampling import SamplingParams
from server.sequence import FinishReason

from .engine_helpers import BASE, collect, copy_adapters, greedy_cases, make_engine, run_one, wait_idle

torch.set_num_threads(1)


def serve(fixture_dir, body, **limits):
    async def main():
        engine = make_engine(fixture_dir, **limits)
        try:
            await body(engine)
            await wait_idle(engine)
            assert engine.stats().num_running == 0
        finally:
            await engine.shutdown(timeout=1.0)
    asyncio.run(main())


def test_streamed_text_is_the_decode_and_never_splits_characters(fixture_dir, expected):
    async def body(engine):
        tok = engine.tokenizer
        prompt = tok.encode("[Round 1]\n\n问：写一首关于春天的诗\n\n答：")
        got = await run_one(engine, "t", BASE, prompt, temperature=1.0, seed=3, max_tokens=120)
        assert got.text == tok.decode(got.token_ids)
        assert any(ord(ch) > 0x2E80 for ch in got.text)  # CJK: multi-byte characters, some split over byte pieces
        assert sum(1 for t in got.texts if t) > 10  # it streamed, not one blob at the end
    serve(fixture_dir, body)


def test_stop_string_split_across_tokens_never_leaks(fixture_dir, expected):
    async def body(engine):
        tok = engine.tokenizer
        _, prompt, new_ids = greedy_cases(expected, BASE)[1]
        full = tok.decode(new_ids)
        # a stop string that starts inside one token and ends inside a later one
        ends = []
        for i in range(len(new_ids)):
            ends.append(len(tok.decode(new_ids[:i + 1])))
        a = ends[5] - 2
        stop = full[a:ends[7] - 1]
        assert len(stop) > 3 and full.find(stop) == a
        got = await run_one(engine, "s", BASE, prompt, temperature=0.0, max_tokens=20, stop=[stop])
        assert got.text == full[:a] and got.finish_reason is FinishReason.STOP and got.stop_reason == stop
        seen = ""
        for t in got.texts:  # what was sent is never taken back and never shows the stop string
            seen += t
            assert full.startswith(seen) and stop not in seen
        inc = await run_one(engine, "i", BASE, prompt, temperature=0.0, max_tokens=20, stop=[stop],
                            include_stop_str_in_output=True)
        assert inc.text == full[:a + len(stop)]
        # held-back text that never becomes a stop string is released at the end
        tail = await run_one(engine, "t", BASE, prompt, temperature=0.0, max_tokens=20, stop=[full[-2:] + "\x00"])
        assert tail.text == full and tail.finish_reason is FinishReason.LENGTH
    serve(fixture_dir, body)


def test_stop_token_ids_min_tokens_and_max_tokens(fixture_dir, expected):
    async def body(engine):
        _, prompt, new_ids = greedy_cases(expected, BASE)[3]
        k = 6
        stop_id = new_ids[k]
        assert stop_id not in new_ids[:k]
        got = await run_one(engine, "a", BASE, prompt, temperature=0.0, max_tokens=20, stop_token_ids=[stop_id])
        assert got.token_ids == new_ids[:k + 1] and got.stop_reason == stop_id
        assert got.finish_reason is FinishReason.STOP
        held = await run_one(engine, "b", BASE, prompt, temperature=0.0, max_tokens=20, stop_token_ids=[stop_id],
                             min_tokens=k + 2)
        assert len(held.token_ids) > k + 1 and stop_id not in held.token_ids[:k + 2]
        short = await run_one(engine, "c", BASE, prompt, temperature=0.0, max_tokens=3)
        assert short.token_ids == new_ids[:3] and short.finish_reason is FinishReason.LENGTH
        assert short.deltas[-1].completion_tokens == 3 and short.deltas[-1].prompt_tokens == len(prompt)
    serve(fixture_dir, body)


def test_logprobs_in_deltas(fixture_dir, expected):
    async def body(engine):
        _, prompt, new_ids = greedy_cases(expected, BASE)[0]
        got = await run_one(engine, "l", BASE, prompt, temperature=0.0, max_tokens=5, logprobs=2)
        assert [lp.token_id for lp in got.logprobs] == new_ids[:5]
        for lp in got.logprobs:
            assert lp.top[0][0] == lp.token_id and lp.top[0][2] == pytest.approx(lp.logprob)
            assert len(lp.top) == 2 and lp.logprob <= 0 and isinstance(lp.token, str)
        plain = await run_one(engine, "p", BASE, prompt, temperature=0.0, max_tokens=2)
        assert all(d.logprobs is None for d in plain.deltas)
    serve(fixture_dir, body)


def test_second_turn_reuses_the_first_turns_kv(fixture_dir, tmp_path):
    ckpts = copy_adapters(fixture_dir, tmp_path / "ckpts")

    async def main():
        engine, fresh = make_engine(fixture_dir, ckpts), make_engine(fixture_dir, ckpts)
        try:
            tok = engine.tokenizer
            p1 = tok.encode("[Round 1]\n\n问：你好\n\n答：")
            t1 = await run_one(engine, "t1", "ptuning-pre8", p1, temperature=0.0, max_tokens=12)
            p2 = p1 + t1.token_ids + tok.encode("\n\n[Round 2]\n\n问：再见\n\n答：", add_special_tokens=False)
            other = await run_one(engine, "x", "ptuning-pre8-proj", p2, temperature=0.0, max_tokens=8)
            assert other.deltas[0].cached_tokens == 0  # never across adapters
            t2 = await run_one(engine, "t2", "ptuning-pre8", p2, temperature=0.0, max_tokens=8)
            # the first turn's prompt and all but its last sampled token had KV
            assert t2.deltas[0].cached_tokens == len(p1) + len(t1.token_ids) - 1
            ref = await run_one(fresh, "r", "ptuning-pre8", p2, temperature=0.0, max_tokens=8)
            assert t2.token_ids == ref.token_ids and ref.deltas[0].cached_tokens == 0
            assert engine.stats().prefix_cache_hits == 1
            await wait_idle(engine)
        finally:
            await engine.shutdown()
            await fresh.shutdown()
    asyncio.run(main())


def test_validation_errors_are_typed(fixture_dir):
    async def body(engine):
        with pytest.raises(ContextLengthExceeded):
            engine.generate("a", [Target(BASE, [5] * 60)], SamplingParams(max_tokens=10))
        with pytest.raises(ModelNotFound):
            engine.generate("b", [Target("nope", [5])], SamplingParams())
        for bad in (dict(temperature=-1), dict(top_p=0), dict(n=0), dict(max_tokens=0), dict(logprobs=50),
                    dict(min_tokens=9, max_tokens=3), dict(stop=[""])):
            with pytest.raises(InvalidRequest):
                engine.generate("c", [Target(BASE, [5])], SamplingParams(**bad))
        with pytest.raises(InvalidRequest):
            engine.generate("d", [Target(BASE, [])], SamplingParams())
        with pytest.raises(InvalidRequest):
            engine.generate("e", [Target(BASE, [10 ** 6])], SamplingParams())
        ok = await run_one(engine, "f", BASE, [5] * 40, temperature=0.0, max_tokens=24)
        assert len(ok.token_ids) == 24
    serve(fixture_dir, body, max_model_len=64)


def test_overloaded_when_the_queue_is_full(fixture_dir):
    async def body(engine):
        params = SamplingParams(temperature=0.0, max_tokens=30)
        streams = [engine.generate(f"r{i}", [Target(BASE, [5, 6, 7])], params) for i in range(3)]
        with pytest.raises(Overloaded):
            engine.generate("one-too-many", [Target(BASE, [5, 6, 7])], params)
        results = await asyncio.gather(*(collect(s) for s in streams))
        assert all(len(r[0].token_ids) == 30 for r in results)
        assert len((await run_one(engine, "after", BASE, [5], temperature=0.0, max_tokens=2)).token_ids) == 2
    serve(fixture_dir, body, max_num_seqs=1, max_waiting=3)


def test_requests_that_could_never_be_queued_are_invalid_not_overloaded(fixture_dir):
    async def body(engine):
        vocab = engine.core.runner.model.config.padded_vocab_size
        with pytest.raises(InvalidRequest, match="max-waiting") as e:
            engine.generate("too-wide", [Target(BASE, [5, 6, 7])] * 2, SamplingParams(temperature=0.0, n=2))
        assert e.value.param == "n"
        with pytest.raises(InvalidRequest, match="stop_token_ids"):
            engine.generate("bad-stop", [Target(BASE, [5])], SamplingParams(stop_token_ids=[vocab]))
        assert len((await run_one(engine, "fine", BASE, [5], temperature=0.0, max_tokens=2)).token_ids) == 2
        assert 0 <= time.time() - engine.base_info().created < 600  # /v1/models `created`: when it was loaded
    serve(fixture_dir, body, max_num_seqs=2, max_waiting=3)


def test_shutdown_aborts_what_is_left(fixture_dir):
    async def main():
        engine = make_engine(fixture_dir)
        stream = engine.generate("long", [Target(BASE, [5, 6, 7])], SamplingParams(temperature=0.0, max_tokens=400))
        first = await stream.__anext__()
        await engine.shutdown(timeout=0.05)
        rest = [d async for d in stream]
        assert not first.finished and rest[-1].finish_reason is FinishReason.ABORT
        assert not engine.ready and engine.stats().num_running == 0
    asyncio.run(main())


def test_a_crashing_step_fails_requests_with_engine_dead(fixture_dir):
    from server.errors import EngineDead

    async def main():
        engine = make_engine(fixture_dir)

        def boom(plan):
            raise RuntimeError("simulated kernel failure")
        engine.core.runner.execute = boom
        with pytest.raises(EngineDead, match="simulated kernel failure"):
            await run_one(engine, "x", BASE, [5, 6], max_tokens=3)
        assert not engine.ready
        with pytest.raises(EngineDead):
            engine.generate("y", [Target(BASE, [5])], SamplingParams())
        await engine.shutdown(timeout=0.1)
    asyncio.run(main())
