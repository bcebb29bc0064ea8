"""Engine acceptance on the THUDM fixture: greedy parity alone and mixed, seeds, n, abort, adapters."""
import asyncio
import gc
import random
import shutil

import pytest
import torch

from server.client import Target
from server.errors import AdapterUnavailable
from server.sampling import SamplingParams
from server.sequence import FinishReason

from .engine_helpers import ADAPTERS, BASE, collect, copy_adapters, greedy_cases, make_engine, run_one, wait_idle

torch.set_num_threads(1)


def serve(fixture_dir, tmp_path, body, **limits):
    """Run `body(engine)` on a fresh engine; afterwards nothing may be left running or waiting."""
    async def main():
        engine = make_engine(fixture_dir, copy_adapters(fixture_dir, tmp_path / "ckpts"), **limits)
        await engine.start()
        try:
            await body(engine)
            await wait_idle(engine)
            s = engine.stats()
            assert s.num_running == 0 and s.kv_used_tokens == 0
        finally:
            await engine.shutdown(timeout=1.0)
    asyncio.run(main())


def test_greedy_matches_thudm_alone(fixture_dir, tmp_path, expected):
    async def body(engine):
        for model in (BASE, *ADAPTERS):
            for name, prompt, new_ids in greedy_cases(expected, model):
                got = await run_one(engine, name, model, prompt, temperature=0.0, max_tokens=len(new_ids))
                assert got.token_ids == new_ids, name
                assert got.finish_reason is FinishReason.LENGTH
    serve(fixture_dir, tmp_path, body)


def test_greedy_matches_thudm_in_one_mixed_batch(fixture_dir, tmp_path, expected):
    """Every recorded generation of the base and both adapters at once, plus sampled noise of other
    lengths, in the same steps: each greedy choice must still be THUDM's exact sequence."""
    async def body(engine):
        cases = [(m, *c) for m in (BASE, *ADAPTERS) for c in greedy_cases(expected, m)]
        rng = random.Random(0)
        noise = [(rng.choice((BASE, *ADAPTERS)), [rng.randrange(5, 3000) for _ in range(rng.randrange(3, 120))])
                 for _ in range(6)]
        tasks = [run_one(engine, name, model, prompt, temperature=0.0, max_tokens=len(new))
                 for model, name, prompt, new in cases]
        tasks += [run_one(engine, f"noise{i}", m, p, temperature=0.9, max_tokens=rng.randrange(5, 40))
                  for i, (m, p) in enumerate(noise)]
        got = await asyncio.gather(*tasks)
        for (model, name, prompt, new), g in zip(cases, got):
            assert g.token_ids == new, name
        assert engine.stats().steps < 30 + 40  # they really ran together
    serve(fixture_dir, tmp_path, body, max_num_seqs=40)


def test_seed_gives_the_same_tokens_alone_and_in_a_busy_batch(fixture_dir, tmp_path, expected):
    async def body(engine):
        prompt = greedy_cases(expected, BASE)[0][1]
        params = dict(temperature=1.0, top_p=0.95, seed=42, max_tokens=24)
        alone = await run_one(engine, "alone", "ptuning-pre8", prompt, **params)
        busy = [run_one(engine, f"b{i}", (BASE, *ADAPTERS)[i % 3], prompt[i % 5:] + [100 + i] * i,
                        temperature=0.8, max_tokens=30) for i in range(8)]
        results = await asyncio.gather(run_one(engine, "again", "ptuning-pre8", prompt, **params), *busy)
        assert results[0].token_ids == alone.token_ids
        other_seed = await run_one(engine, "other", "ptuning-pre8", prompt, **{**params, "seed": 43})
        assert other_seed.token_ids != alone.token_ids
    serve(fixture_dir, tmp_path, body)


def test_n_choices_come_from_one_prefill(fixture_dir, tmp_path, expected):
    async def body(engine):
        prompt = greedy_cases(expected, BASE)[4][1]  # the long chat-history prompt
        before = engine.core.runner.num_tokens_computed
        out = await collect(engine.generate("n3", [Target("ptuning-pre8-proj", prompt)],
                                            SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10)))
        assert sorted(out) == [0, 1, 2]
        assert all(len(c.token_ids) == 10 and c.finish_reason is FinishReason.LENGTH for c in out.values())
        assert len({tuple(c.token_ids) for c in out.values()}) == 3  # each choice samples on its own
        # the prompt ran once; each choice then decoded its 9 further tokens
        assert engine.core.runner.num_tokens_computed - before == len(prompt) + 3 * 9
        greedy = await collect(engine.generate("g3", [Target(BASE, prompt)], SamplingParams(n=3, temperature=0.0, max_tokens=20)))
        assert all(c.token_ids == greedy_cases(expected, BASE)[4][2] for c in greedy.values())
    serve(fixture_dir, tmp_path, body)


def test_abort_frees_kv_within_one_step(fixture_dir, tmp_path, expected):
    async def body(engine):
        prompt = greedy_cases(expected, BASE)[0][1]
        stream = engine.generate("long", [Target("ptuning-pre8", prompt)], SamplingParams(temperature=0.0, max_tokens=400))
        await stream.__anext__()
        await stream.__anext__()
        assert engine.stats().kv_used_tokens > 0
        steps = engine.stats().steps
        engine.abort("long")
        last = None
        async for d in stream:
            last = d
        s = engine.stats()
        assert last.finish_reason is FinishReason.ABORT
        assert s.num_running == 0 and s.kv_used_tokens == 0 and s.steps <= steps + 1
        # closing the iterator early aborts too: explicitly, by cancellation, or by dropping it
        for close in ("aclose", "cancel", "drop"):
            it = engine.generate(close, [Target(BASE, prompt)], SamplingParams(temperature=0.0, max_tokens=400))
            await it.__anext__()
            if close == "aclose":
                await it.aclose()
            elif close == "drop":
                del it
                gc.collect()
            else:
                task = asyncio.ensure_future(it.__anext__())
                await asyncio.sleep(0)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            await wait_idle(engine)
    serve(fixture_dir, tmp_path, body)


def test_registry_refusals_while_others_serve(fixture_dir, tmp_path, expected):
    ckpts = copy_adapters(fixture_dir, tmp_path / "ckpts")
    wrong = ckpts / "wrong_shape"
    shutil.copytree(fixture_dir / "ptuning-pre8", wrong)
    sd = torch.load(wrong / "pytorch_model.bin", weights_only=True)
    key = "transformer.prefix_encoder.embedding.weight"
    torch.save({key: sd[key][:, :-32]}, wrong / "pytorch_model.bin")
    shutil.copytree(fixture_dir / "ptuning-pre8", ckpts / "corrupt")
    (ckpts / "corrupt" / "pytorch_model.bin").write_bytes(b"\x80\x02garbage")

    async def main():
        engine = make_engine(fixture_dir, ckpts)
        name, prompt, new_ids = greedy_cases(expected, "ptuning-pre8")[1]
        good = asyncio.ensure_future(run_one(engine, "good", "ptuning-pre8", prompt, temperature=0.0, max_tokens=20))
        for bad, reason in (("wrong_shape", "prefix width"), ("corrupt", "cannot read")):
            with pytest.raises(AdapterUnavailable, match=reason):
                await run_one(engine, bad, bad, prompt, max_tokens=4)
            with pytest.raises(AdapterUnavailable, match=reason):  # known bad now: refused at once
                engine.resolve(bad)
        assert (await good).token_ids == new_ids
        states = {m.id: m.state.value for m in engine.models()}
        assert states["wrong_shape"] == states["corrupt"] == "failed" and states["ptuning-pre8"] == "loaded"
        await wait_idle(engine)
        await engine.shutdown()
    asyncio.run(main())


def test_rewritten_checkpoint_serves_new_requests_only(fixture_dir, tmp_path, expected):
    async def body(engine):
        folder = engine.registry.entry("ptuning-pre8").path
        _, prompt, old_ids = greedy_cases(expected, "ptuning-pre8")[0]
        new_ids = greedy_cases(expected, "ptuning-pre8-proj")[0][2]
        assert old_ids != new_ids
        v1 = engine.resolve("ptuning-pre8")
        running = engine.generate("old", [Target("ptuning-pre8", prompt)], SamplingParams(temperature=0.0, max_tokens=20))
        first = await running.__anext__()
        for f in folder.iterdir():  # the trainer overwrites the checkpoint in place
            f.unlink()
        for f in (fixture_dir / "ptuning-pre8-proj").iterdir():
            shutil.copy(f, folder / f.name)
        later = await run_one(engine, "new", "ptuning-pre8", prompt, temperature=0.0, max_tokens=20)
        rest = await collect(running)
        assert first.token_ids + rest[0].token_ids == old_ids  # finished on the version it started with
        assert later.token_ids == new_ids
        v2 = engine.resolve("ptuning-pre8")
        assert v2.version != v1.version and later.deltas[0].fingerprint != first.fingerprint
    serve(fixture_dir, tmp_path, body)


def test_fan_out_one_choice_per_target(fixture_dir, tmp_path, expected):
    async def body(engine):
        targets = [Target(m, greedy_cases(expected, m)[2][1]) for m in (BASE, *ADAPTERS)]
        out = await collect(engine.generate("fan", targets, SamplingParams(n=2, temperature=0.0, max_tokens=20)))
        assert sorted(out) == list(range(6))
        for t, model in enumerate((BASE, *ADAPTERS)):
            for c in range(2):
                assert out[t * 2 + c].token_ids == greedy_cases(expected, model)[2][2]
                assert out[t * 2 + c].deltas[0].model == model
    serve(fixture_dir, tmp_path, body)
