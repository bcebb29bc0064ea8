"""Batched sampling with per-row parameters: penalties, temperature, top-k, top-p, seeds, logprobs.

Order follows THUDM's chat() (transformers' processors): non-finite guard, repetition penalty,
then temperature, top-k, top-p. A token is drawn as argmax(p / E) with E ~ Exp(1) (the same
distribution as multinomial, without a host sync). Rows with a seed draw E from their own
generator, so their tokens do not depend on what else is in the batch. Logprobs are those of the
model's raw distribution (before penalties and warping), as vLLM reports them by default.

`prepare` builds every per-row tensor before the forward is enqueued, so on a GPU the step's
only host sync is reading the sampled ids back.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .sequence import Sequence


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float | None]  # the chosen token's logprob, for rows that asked
    top_logprobs: list[list[tuple[int, float]] | None]  # best first


@dataclass
class SamplingBatch:
    seqs: list[Sequence]
    greedy: list[bool]
    greedy_t: torch.Tensor | None = None  # [R] bool
    temps: torch.Tensor | None = None  # [R]
    top_k: tuple[torch.Tensor, torch.Tensor] | None = None  # rows [K], k [K]
    top_p: tuple[torch.Tensor, torch.Tensor] | None = None  # rows [P], p [P]
    repetition: list[tuple[int, torch.Tensor, float]] = field(default_factory=list)  # row, seen ids [U], penalty
    additive: tuple[torch.Tensor, torch.Tensor] | None = None  # rows [A], presence/frequency penalty [A, V]
    blocked: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, ids) that min_tokens forbids
    shared_rows: torch.Tensor | None = None  # unseeded sampled rows
    seeded_rows: list[int] = field(default_factory=list)
    logprob_rows: list[int] = field(default_factory=list)
    logprob_idx: torch.Tensor | None = None  # [L]


def make_generator(seed: int, choice: int, device: torch.device | str) -> torch.Generator:
    """The generator of one seeded choice; choice i of n gets its own stream."""
    return torch.Generator(device).manual_seed((seed * 1_000_003 + choice) % (2 ** 63))


class Sampler:
    def __init__(self, eos_id: int, vocab_size: int, device: torch.device | str, seed: int = 0):
        self.eos_id = eos_id
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.generator = torch.Generator(self.device).manual_seed(seed)

    def prepare(self, seqs: list[Sequence]) -> SamplingBatch:
        dev, V = self.device, self.vocab_size
        b = SamplingBatch(seqs, [s.params.temperature == 0.0 for s in seqs])
        sampled = [i for i, g in enumerate(b.greedy) if not g]
        if sampled:
            b.greedy_t = torch.tensor(b.greedy, device=dev)
            b.temps = torch.tensor([s.params.temperature or 1.0 for s in seqs], device=dev)
            rows = [i for i in sampled if 0 < seqs[i].params.top_k < V]
            if rows:
                b.top_k = (torch.tensor(rows, device=dev), torch.tensor([seqs[i].params.top_k for i in rows], device=dev))
            rows = [i for i in sampled if seqs[i].params.top_p < 1.0]
            if rows:
                b.top_p = (torch.tensor(rows, device=dev), torch.tensor([seqs[i].params.top_p for i in rows], device=dev))
            shared = [i for i in sampled if seqs[i].generator is None]
            b.shared_rows = torch.tensor(shared, device=dev) if shared else None
            b.seeded_rows = [i for i in sampled if seqs[i].generator is not None]
        add_rows, add = [], []
        for i, s in enumerate(seqs):
            p = s.params
            if p.repetition_penalty != 1.0:  # HF: every prompt and output token
                seen = torch.tensor(sorted(set(s.token_ids)), dtype=torch.long, device=dev)  # [U]
                b.repetition.append((i, seen, p.repetition_penalty))
            if (p.presence_penalty or p.frequency_penalty) and s.num_output:  # OpenAI: output tokens only
                out = torch.tensor(s.output_ids, dtype=torch.long, device=dev)
                counts = torch.bincount(out, minlength=V)[:V].float()  # [V]
                add_rows.append(i)
                add.append(p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float())
        if add_rows:
            b.additive = (torch.tensor(add_rows, device=dev), torch.stack(add))  # [A], [A, V]
        blocked_rows, blocked_ids = [], []
        for i, s in enumerate(seqs):
            if s.num_output < s.params.min_tokens:  # eos and stop ids cannot be drawn yet
                ids = list(s.params.stop_token_ids) + ([] if s.params.ignore_eos else [self.eos_id])
                blocked_rows += [i] * len(ids)
                blocked_ids += ids
        if blocked_rows:
            b.blocked = (torch.tensor(blocked_rows, device=dev), torch.tensor(blocked_ids, device=dev))
        b.logprob_rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if b.logprob_rows:
            b.logprob_idx = torch.tensor(b.logprob_rows, device=dev)
        return b

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """prepare + call, for callers that have the logits already."""
        return self(logits, self.prepare(seqs))

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """logits [R, V] (one row per sequence that samples) -> next token per row."""
        R, V = logits.shape
        raw = logits.float()
        # THUDM's InvalidScoreLogitsProcessor turns a row with NaN/inf into "always token 5"; NaN
        # and inf survive amax/amin, so two reductions find such rows without a pass that copies.
        bad = ~(torch.isfinite(raw.amax(-1)) & torch.isfinite(raw.amin(-1)))  # [R]
        x = raw
        if batch.repetition or batch.additive is not None or batch.blocked is not None:
            x = raw.clone()
            for i, seen, penalty in batch.repetition:
                v = x[i, seen]
                x[i, seen] = torch.where(v > 0, v / penalty, v * penalty)
            if batch.additive is not None:
                rows, delta = batch.additive
                x[rows] -= delta
            if batch.blocked is not None:
                x[batch.blocked] = float("-inf")
        ids = x.argmax(-1)  # [R]
        if batch.temps is not None:
            ids = torch.where(batch.greedy_t, ids, self._sample(x, batch))
        ids = torch.where(bad, torch.full_like(ids, min(5, V - 1)), ids)
        return self._finish(raw, ids, batch)

    def _sample(self, x: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
        x = x / b.temps[:, None]  # [R, V]
        if b.top_k is not None:
            rows, ks = b.top_k
            sub = x[rows]  # [K, V]
            kth = torch.topk(sub, int(ks.max()), dim=-1).values.gather(1, (ks - 1)[:, None])  # [K, 1]
            x[rows] = sub.masked_fill(sub < kth, float("-inf"))
        if b.top_p is not None:
            rows, ps = b.top_p
            sub = x[rows]  # [P, V]
            srt, order = sub.sort(-1, descending=True)
            probs = srt.softmax(-1)
            drop = (probs.cumsum(-1) - probs) > ps[:, None]  # mass before the token already exceeds top_p
            drop[:, 0] = False
            x[rows] = sub.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        probs = x.softmax(-1)  # [R, V]
        noise = torch.ones_like(probs)
        if b.shared_rows is not None:
            noise[b.shared_rows] = torch.empty(len(b.shared_rows), x.shape[1], device=x.device).exponential_(
                generator=self.generator)
        for i in b.seeded_rows:
            noise[i].exponential_(generator=b.seqs[i].generator)
        return (probs / noise.clamp_(min=1e-30)).argmax(-1)  # [R]; clamp: 0/0 would win argmax as NaN

    def _finish(self, raw: torch.Tensor, ids: torch.Tensor, b: SamplingBatch) -> SamplerOutput:
        n = len(b.seqs)
        chosen: list[float | None] = [None] * n
        tops: list[list[tuple[int, float]] | None] = [None] * n
        if not b.logprob_rows:
            return SamplerOutput(ids.tolist(), chosen, tops)
        idx = b.logprob_idx
        lp = raw[idx].log_softmax(-1)  # [L, V]
        picked = lp.gather(1, ids[idx][:, None]).squeeze(1)  # [L]
        k = max(b.seqs[i].params.logprobs for i in b.logprob_rows)
        top_lp, top_ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())  # [L, k]
        ids_l, picked_l, top_lp_l, top_ids_l = ids.tolist(), picked.tolist(), top_lp.tolist(), top_ids.tolist()
        for j, i in enumerate(b.logprob_rows):
            k_i = b.seqs[i].params.logprobs
            chosen[i] = picked_l[j]
            tops[i] = list(zip(top_ids_l[j][:k_i], top_lp_l[j][:k_i]))
        return SamplerOutput(ids_l, chosen, tops)
