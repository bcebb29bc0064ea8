"""Batched sampling with per-row parameters: penalties, temperature, top-k, top-p, seeds, logprobs.

Order follows THUDM's chat() (transformers' processors): non-finite guard, repetition penalty,
then temperature, top-k, top-p. A token is drawn as argmax(p / E) with E ~ Exp(1) (the same
distribution as multinomial, without a host sync). Rows with a seed draw E from their own
generator, so their tokens do not depend on what else is in the batch. Logprobs are those of the
model's raw distribution (before penalties and warping), as vLLM reports them by default.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .sequence import Sequence


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float | None]  # the chosen token's logprob, for rows that asked
    top_logprobs: list[list[tuple[int, float]] | None]  # best first


def make_generator(seed: int, choice: int, device: torch.device | str) -> torch.Generator:
    """The generator of one seeded choice; choice i of n gets its own stream."""
    return torch.Generator(device).manual_seed((seed * 1_000_003 + choice) % (2 ** 63))


class Sampler:
    def __init__(self, eos_id: int, device: torch.device | str, seed: int = 0):
        self.eos_id = eos_id
        self.device = torch.device(device)
        self.generator = torch.Generator(self.device).manual_seed(seed)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """logits [R, V] (one row per sequence that samples) -> next token per row."""
        R, V = logits.shape
        raw = logits.float()
        # THUDM's InvalidScoreLogitsProcessor turns a row with NaN/inf into "always token 5"; NaN
        # and inf survive amax/amin, so two reductions find such rows without a pass that copies.
        bad = ~(torch.isfinite(raw.amax(-1)) & torch.isfinite(raw.amin(-1)))  # [R]
        x = self._penalize(raw, seqs)
        x = self._block_stops(x, seqs)
        greedy_rows = [s.params.temperature == 0.0 for s in seqs]
        if all(greedy_rows):
            ids = x.argmax(-1)  # [R]
        else:
            ids = self._sample(x, seqs, greedy_rows)
        ids = torch.where(bad, torch.full_like(ids, min(5, V - 1)), ids)
        return self._finish(raw, ids, seqs)

    def _penalize(self, x: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        rows = [i for i, s in enumerate(seqs) if s.params.repetition_penalty != 1.0
                or s.params.presence_penalty or s.params.frequency_penalty]
        if not rows:
            return x
        x = x.clone()
        for i in rows:
            p, seq = seqs[i].params, seqs[i]
            if p.repetition_penalty != 1.0:  # HF: every prompt and output token, divide if > 0 else multiply
                seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=x.device)  # [U]
                v = x[i, seen]
                x[i, seen] = torch.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
            if (p.presence_penalty or p.frequency_penalty) and seq.num_output:  # OpenAI: output tokens only
                out = torch.tensor(seq.output_ids, dtype=torch.long, device=x.device)
                counts = torch.bincount(out, minlength=x.shape[1]).to(x.dtype)  # [V]
                x[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(x.dtype)
        return x

    def _block_stops(self, x: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Before min_tokens, eos and stop token ids cannot be drawn."""
        rows = [i for i, s in enumerate(seqs) if s.num_output < s.params.min_tokens]
        if not rows:
            return x
        x = x.clone()
        for i in rows:
            p = seqs[i].params
            stops = list(p.stop_token_ids) + ([] if p.ignore_eos else [self.eos_id])
            if stops:
                x[i, torch.tensor(stops, dtype=torch.long, device=x.device)] = float("-inf")
        return x

    def _sample(self, x: torch.Tensor, seqs: list[Sequence], greedy_rows: list[bool]) -> torch.Tensor:
        R, V = x.shape
        dev = x.device
        greedy_ids = x.argmax(-1)  # [R]
        temps = torch.tensor([s.params.temperature or 1.0 for s in seqs], device=dev)  # [R]
        x = x / temps[:, None]  # [R, V]
        topk_rows = [i for i, s in enumerate(seqs) if 0 < s.params.top_k < V and not greedy_rows[i]]
        if topk_rows:
            idx = torch.tensor(topk_rows, device=dev)
            ks = torch.tensor([seqs[i].params.top_k for i in topk_rows], device=dev)  # [K]
            sub = x[idx]  # [K, V]
            vals = torch.topk(sub, int(ks.max()), dim=-1).values  # [K, kmax]
            kth = vals.gather(1, (ks - 1)[:, None])  # [K, 1]
            x[idx] = sub.masked_fill(sub < kth, float("-inf"))
        topp_rows = [i for i, s in enumerate(seqs) if s.params.top_p < 1.0 and not greedy_rows[i]]
        if topp_rows:
            idx = torch.tensor(topp_rows, device=dev)
            ps = torch.tensor([seqs[i].params.top_p for i in topp_rows], device=dev)  # [P]
            sub = x[idx]  # [P, V]
            srt, order = sub.sort(-1, descending=True)  # [P, V]
            probs = srt.softmax(-1)
            drop = (probs.cumsum(-1) - probs) > ps[:, None]  # mass before the token already exceeds top_p
            drop[:, 0] = False
            x[idx] = sub.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        probs = x.softmax(-1)  # [R, V]
        noise = torch.empty_like(probs)
        shared = [i for i, s in enumerate(seqs) if s.generator is None and not greedy_rows[i]]
        if shared:
            noise[shared] = torch.empty(len(shared), V, device=dev).exponential_(generator=self.generator)
        for i, s in enumerate(seqs):
            if s.generator is not None and not greedy_rows[i]:
                noise[i].exponential_(generator=s.generator)
        sampled = (probs / noise.clamp_(min=1e-30)).argmax(-1)  # [R]; clamp: 0/0 would win argmax as NaN
        greedy = torch.tensor(greedy_rows, device=dev)
        return torch.where(greedy, greedy_ids, sampled)

    def _finish(self, raw: torch.Tensor, ids: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        chosen: list[float | None] = [None] * len(seqs)
        tops: list[list[tuple[int, float]] | None] = [None] * len(seqs)
        if not rows:
            return SamplerOutput(ids.tolist(), chosen, tops)
        idx = torch.tensor(rows, device=raw.device)
        lp = raw[idx].log_softmax(-1)  # [L, V]
        picked = lp.gather(1, ids[idx][:, None]).squeeze(1)  # [L]
        k = max(seqs[i].params.logprobs for i in rows)
        top_lp, top_ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())  # [L, k]
        ids_l, picked_l, top_lp_l, top_ids_l = ids.tolist(), picked.tolist(), top_lp.tolist(), top_ids.tolist()
        for j, i in enumerate(rows):
            n = seqs[i].params.logprobs
            chosen[i] = picked_l[j]
            tops[i] = list(zip(top_ids_l[j][:n], top_lp_l[j][:n]))
        return SamplerOutput(ids_l, chosen, tops)
