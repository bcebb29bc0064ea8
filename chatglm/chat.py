"""THUDM's `chat` and `stream_chat` over our model and tokenizer (history as (query, response) pairs)."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .attention import DenseKVCache
from .generation import iter_generate
from .model import ChatGLM
from .prefix import PrefixKV
from .tokenizer import ChatGLMTokenizer, process_response

History = list[tuple[str, str]]


@dataclass
class ChatPast:
    """KV of the conversation so far, for stream_chat(..., past=...) reuse across turns."""

    cache: DenseKVCache


def _prompt_tensors(tokenizer: ChatGLMTokenizer, ids: list[int], past: ChatPast | None):
    input_ids = torch.tensor([ids])
    if past is None:
        return input_ids, None, None
    # Continue after the cached turns: positions go on from where the past stopped.
    pos = past.cache.next_pos[:, None] + torch.arange(len(ids))[None]
    return input_ids, None, pos


@torch.inference_mode()
def stream_chat(model: ChatGLM, tokenizer: ChatGLMTokenizer, query: str, history: History | None = None, *,
                prefix: PrefixKV | None = None, past: ChatPast | None = None, return_past: bool = False,
                do_sample: bool = True, max_new_tokens: int = 8192, temperature: float = 0.8, top_p: float = 0.8,
                top_k: int = 50, generator: torch.Generator | None = None) -> Iterator[tuple]:
    """Yield (response so far, history + [(query, response)]) as the answer grows, plus the
    ChatPast when `return_past` (THUDM's return_past_key_values). A yield never ends in a
    partial character."""
    history = list(history or [])
    if past is None and not return_past:
        ids = tokenizer.build_chat_input(query, history)
    elif past is not None and history:
        ids = tokenizer.build_stream_suffix_ids(query, history)
    else:
        ids = tokenizer.build_chat_input(query, history)
    cache = past.cache if past is not None else DenseKVCache(model.config.num_layers)
    input_ids, mask, pos = _prompt_tensors(tokenizer, ids, past)
    new_ids: list[int] = []
    response = ""
    for tok in iter_generate(model, input_ids, mask, pos, prefix=prefix if past is None else None, cache=cache,
                             max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                             top_k=top_k, top_p=top_p, eos_token_id=tokenizer.eos_id, generator=generator):
        t = int(tok[0])
        if t == tokenizer.eos_id:
            break
        new_ids.append(t)
        text = tokenizer.decode(new_ids)
        if text and not text.endswith("\ufffd"):
            response = process_response(text)
            out = (response, history + [(query, response)])
            yield (*out, ChatPast(cache)) if return_past else out
    final = process_response(tokenizer.decode(new_ids))
    if final != response or not new_ids:
        out = (final, history + [(query, final)])
        yield (*out, ChatPast(cache)) if return_past else out


def chat(model: ChatGLM, tokenizer: ChatGLMTokenizer, query: str, history: History | None = None, *,
         prefix: PrefixKV | None = None, do_sample: bool = True, max_new_tokens: int = 8192,
         temperature: float = 0.8, top_p: float = 0.8, top_k: int = 50,
         generator: torch.Generator | None = None) -> tuple[str, History]:
    """THUDM's model.chat: the whole answer and the extended history."""
    response, new_history = "", list(history or [])
    for response, new_history in stream_chat(model, tokenizer, query, history, prefix=prefix, do_sample=do_sample,
                                             max_new_tokens=max_new_tokens, temperature=temperature,
                                             top_p=top_p, top_k=top_k, generator=generator):
        pass
    return response, new_history
