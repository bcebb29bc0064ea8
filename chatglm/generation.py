"""Reference generation on the padded-batch path: `generate`, and THUDM's `chat` / `stream_chat`.

This is the simple, exact path (the serving engine has its own batched loop). Sampling follows
transformers' order as THUDM's chat() uses it: NaN/inf guard, temperature, top-k, top-p.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .attention import DenseKVCache
from .model import ChatGLM
from .prefix import PrefixKV


def _warp(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    # logits [B, V] fp32
    if not torch.isfinite(logits).all():  # THUDM's InvalidScoreLogitsProcessor
        logits = torch.zeros_like(logits)
        logits[..., 5] = 5e4
    if temperature != 1.0:
        logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= (1 - top_p)
        drop[..., -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, *, do_sample: bool, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]."""
    logits = logits.float()
    if not do_sample:
        if not torch.isfinite(logits).all():
            logits = _warp(logits, 1.0, 0, 1.0)
        return logits.argmax(-1)
    probs = _warp(logits, temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def iter_generate(model: ChatGLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  position_ids: torch.Tensor | None = None, *,
                  prefix: PrefixKV | Sequence[PrefixKV | None] | None = None, cache: DenseKVCache | None = None,
                  max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, eos_token_id: int = 2, pad_token_id: int = 0,
                  generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row [B] per step; finished rows yield `pad_token_id`.

    The cache ends up holding the prompt and every generated token except the last one, as
    THUDM's stream_chat leaves its past_key_values.
    """
    cache = cache if cache is not None else DenseKVCache(model.config.num_layers)
    B = input_ids.shape[0]
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    ids, mask, pos = input_ids, attention_mask, position_ids
    for step in range(max_new_tokens):
        logits = model(ids, mask, pos, prefix=prefix if cache.length == 0 else None, cache=cache, last_only=True)
        tok = next_tokens(logits[:, -1], do_sample=do_sample, temperature=temperature, top_k=top_k,
                          top_p=top_p, generator=generator)  # [B]
        tok = torch.where(done, torch.full_like(tok, pad_token_id), tok)
        yield tok
        done |= tok == eos_token_id
        if bool(done.all()) or step == max_new_tokens - 1:
            return
        ids, mask, pos = tok[:, None], None, None


@torch.inference_mode()
def generate(model: ChatGLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             position_ids: torch.Tensor | None = None, **kwargs) -> list[list[int]]:
    """New token ids per row, up to and including eos (no padding after it)."""
    eos = kwargs.get("eos_token_id", 2)
    steps = list(iter_generate(model, input_ids, attention_mask, position_ids, **kwargs))
    out = []
    for row in (torch.stack(steps, 1).tolist() if steps else [[] for _ in range(input_ids.shape[0])]):
        out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out
