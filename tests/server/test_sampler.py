"""Batched sampler: per-row parameters, seeds independent of the batch, penalties, logprobs."""
import itertools

import pytest
import torch

from server.sampler import Sampler, make_generator
from server.sampling import SamplingParams
from server.sequence import Sequence

torch.set_num_threads(1)
EOS = 2
_ids = itertools.count()


def seq(prompt=(9,), output=(), **kw):
    p = SamplingParams(**kw)
    s = Sequence(next(_ids), "r", 0, [*prompt, *output], len(prompt), p, ())
    if p.seed is not None:
        s.generator = make_generator(p.seed, 0, "cpu")
    return s


class _Sampler:
    """The sampler as the tests call it: logits and their sequences (prepare + call)."""

    def __init__(self, seed):
        self.seed = seed

    def __call__(self, logits, seqs):
        if not hasattr(self, "s"):
            self.s = Sampler(EOS, logits.shape[1], "cpu", self.seed)
        return self.s.sample(logits, seqs)


def sampler(seed=0):
    return _Sampler(seed)


def test_greedy_rows_take_the_argmax():
    logits = torch.randn(5, 50)
    out = sampler()(logits, [seq(temperature=0.0) for _ in range(5)])
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 5


def test_mixed_greedy_and_sampled_rows():
    logits = torch.randn(4, 30)
    rows = [seq(temperature=0.0), seq(temperature=1.0, top_k=1), seq(temperature=0.0), seq(temperature=0.7, top_k=1)]
    assert sampler()(logits, rows).token_ids == logits.argmax(-1).tolist()


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, 4)
    out = sampler(1)(logits, [seq(temperature=1.0) for _ in range(4000)])
    freq = torch.bincount(torch.tensor(out.token_ids), minlength=4).float() / 4000
    assert (freq - probs).abs().max() < 0.03


def test_temperature_sharpens():
    logits = torch.tensor([[2.0, 1.0, 0.0]]).expand(3000, 3)
    hot = sampler(2)(logits, [seq(temperature=2.0) for _ in range(3000)]).token_ids
    cold = sampler(2)(logits, [seq(temperature=0.25) for _ in range(3000)]).token_ids
    assert cold.count(0) > 2900 > hot.count(0) > 1000


def test_top_k_and_top_p_restrict_the_support():
    torch.manual_seed(0)
    logits = torch.randn(1, 100).expand(600, 100)
    order = logits[0].argsort(descending=True).tolist()
    out = sampler(3)(logits, [seq(temperature=1.5, top_k=3) for _ in range(600)]).token_ids
    assert set(out) <= set(order[:3]) and len(set(out)) == 3
    probs = torch.tensor([0.6, 0.25, 0.1, 0.05])
    lp = probs.log().expand(500, 4)
    assert set(sampler(4)(lp, [seq(top_p=0.5) for _ in range(500)]).token_ids) == {0}
    assert set(sampler(4)(lp, [seq(top_p=0.8) for _ in range(500)]).token_ids) == {0, 1}
    both = sampler(4)(lp, [seq(top_p=0.95, top_k=2) for _ in range(500)]).token_ids
    assert set(both) == {0, 1}


def test_seed_does_not_depend_on_the_batch():
    torch.manual_seed(1)
    steps = [torch.randn(1, 64) for _ in range(12)]
    alone, busy = seq(temperature=1.0, seed=1234), seq(temperature=1.0, seed=1234)
    others = [seq(temperature=1.0), seq(temperature=0.0), seq(temperature=0.9, seed=7, top_p=0.9)]
    s1, s2 = sampler(0), sampler(99)
    got_alone, got_busy = [], []
    for i, row in enumerate(steps):
        got_alone.append(s1(row, [alone]).token_ids[0])
        batch = torch.cat([torch.randn(2, 64), row, torch.randn(1, 64)])
        rows = [others[0], others[1], busy, others[2]] if i % 2 else [busy, *others]
        if i % 2 == 0:
            batch = torch.cat([row, torch.randn(3, 64)])
        got_busy.append(s2(batch, rows).token_ids[rows.index(busy)])
    assert got_alone == got_busy
    assert len(set(got_alone)) > 3  # it really sampled


def test_choices_of_one_seed_get_their_own_streams():
    g0, g1 = make_generator(5, 0, "cpu"), make_generator(5, 1, "cpu")
    assert not torch.equal(torch.rand(8, generator=g0), torch.rand(8, generator=g1))


def test_repetition_penalty_thudm_style():
    logits = torch.tensor([[3.0, 2.9, -1.0, -1.1]])
    assert sampler()(logits, [seq(prompt=(0,), temperature=0.0)]).token_ids == [0]
    # 3.0 / 1.2 = 2.5 < 2.9: the seen token loses; negative seen logits get multiplied
    assert sampler()(logits, [seq(prompt=(0,), temperature=0.0, repetition_penalty=1.2)]).token_ids == [1]
    neg = torch.tensor([[-1.0, -1.1, -5.0, -5.0]])
    assert sampler()(neg, [seq(prompt=(0,), temperature=0.0, repetition_penalty=1.2)]).token_ids == [1]


def test_presence_and_frequency_penalties_count_output_tokens_only():
    logits = torch.tensor([[5.0, 4.5, 0.0, 0.0]])
    prompt_only = seq(prompt=(0, 0, 0), temperature=0.0, frequency_penalty=1.0)
    assert sampler()(logits, [prompt_only]).token_ids == [0]
    out_twice = seq(prompt=(3,), output=(0, 0), temperature=0.0, frequency_penalty=0.3)
    assert sampler()(logits, [out_twice]).token_ids == [1]  # 5.0 - 2 * 0.3 < 4.5
    presence = seq(prompt=(3,), output=(0,), temperature=0.0, presence_penalty=0.6)
    assert sampler()(logits, [presence]).token_ids == [1]


def test_min_tokens_blocks_eos_and_stop_ids():
    logits = torch.tensor([[0.0, 0.0, 9.0, 8.0, 1.0]])
    early = seq(output=(4,), temperature=0.0, min_tokens=3, stop_token_ids=[3])
    assert sampler()(logits, [early]).token_ids == [4]
    late = seq(output=(4, 4, 4), temperature=0.0, min_tokens=3, stop_token_ids=[3])
    assert sampler()(logits, [late]).token_ids == [EOS]


def test_logprobs_of_the_raw_distribution():
    logits = torch.randn(3, 40)
    rows = [seq(temperature=0.0, logprobs=3), seq(temperature=0.0), seq(temperature=0.0, logprobs=0)]
    out = sampler()(logits, rows)
    ref = logits.log_softmax(-1)
    assert out.logprobs[0] == pytest.approx(ref[0].max().item(), abs=1e-5)
    assert out.logprobs[1] is None and out.top_logprobs[1] is None
    assert out.top_logprobs[2] == [] and out.logprobs[2] == pytest.approx(ref[2].max().item(), abs=1e-5)
    top = out.top_logprobs[0]
    assert [t for t, _ in top] == ref[0].topk(3).indices.tolist()
    assert [lp for _, lp in top] == pytest.approx(ref[0].topk(3).values.tolist(), abs=1e-5)


def test_non_finite_logits_fall_back_like_thudm():
    logits = torch.randn(2, 10)
    logits[1, 3] = float("nan")
    assert sampler()(logits, [seq(temperature=0.0), seq(temperature=0.0)]).token_ids[1] == 5
