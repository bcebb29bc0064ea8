"""Per-choice output processing on the engine thread: stop rules, streaming text, logprobs.

Text comes from the tokenizer's IncrementalDetokenizer, so a multi-byte character is never split.
Stop strings are matched on the text; the tail that could still become a stop string is held back,
so a stop string split across tokens never leaks into the stream.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

from .sequence import FinishReason, RequestOutput, Sequence, TokenLogprob


class Detokenizer(Protocol):
    def push(self, new_ids: list[int]) -> str: ...

    def flush(self) -> str: ...


class Tokenizer(Protocol):
    eos_id: int

    def decode_continuation(self, ids: list[int]) -> str: ...


@dataclass
class ChoiceState:
    detok: Detokenizer
    pending: str = ""  # text held back: it may be the start of a stop string
    new_ids: list[int] = field(default_factory=list)  # ids not yet sent
    new_text: list[str] = field(default_factory=list)
    new_logprobs: list[TokenLogprob] = field(default_factory=list)


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, max_model_len: int, make_detokenizer: Callable[[Tokenizer], Detokenizer]):
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_id
        self.max_model_len = max_model_len
        self.make_detokenizer = make_detokenizer
        self._token_text: dict[int, str] = {}

    def start(self, seq: Sequence) -> None:
        seq.out = ChoiceState(self.make_detokenizer(self.tokenizer))

    def token_text(self, token_id: int) -> str:
        t = self._token_text.get(token_id)
        if t is None:
            t = self._token_text[token_id] = self.tokenizer.decode_continuation([token_id])
        return t

    def append(self, seq: Sequence, token_id: int, logprob: float | None,
               top: list[tuple[int, float]] | None) -> tuple[FinishReason, str | int | None] | None:
        """Add one sampled token; returns (reason, stop_reason) when the choice is finished."""
        st: ChoiceState = seq.out
        p = seq.params
        seq.token_ids.append(token_id)
        st.new_ids.append(token_id)
        if logprob is not None:
            st.new_logprobs.append(TokenLogprob(token_id, self.token_text(token_id), logprob,
                                                [(i, self.token_text(i), lp) for i, lp in (top or [])]))
        n_out = seq.num_output
        stop_token = (token_id == self.eos_id and not p.ignore_eos) or token_id in p.stop_token_ids
        if stop_token and n_out >= p.min_tokens:
            self._emit(st, st.pending + st.detok.flush())
            return FinishReason.STOP, (None if token_id == self.eos_id and token_id not in p.stop_token_ids else token_id)
        text = st.pending + st.detok.push([token_id])
        st.pending = ""
        if p.stop and n_out >= p.min_tokens:
            hit = min(((text.find(s), s) for s in p.stop if s in text), default=None)
            if hit is not None:
                i, s = hit
                self._emit(st, text[:i + len(s)] if p.include_stop_str_in_output else text[:i])
                return FinishReason.STOP, s
            keep = _held_back(text, p.stop)
            if keep:
                text, st.pending = text[:-keep], text[-keep:]
        self._emit(st, text)
        limit = p.max_tokens if p.max_tokens is not None else self.max_model_len
        if n_out >= limit or seq.num_tokens >= self.max_model_len:
            self._emit(st, st.pending + st.detok.flush())
            st.pending = ""
            return FinishReason.LENGTH, None
        return None

    def finish_text(self, seq: Sequence) -> None:
        """A choice ended from outside (abort): release what was held back."""
        st: ChoiceState = seq.out
        if st is not None:
            self._emit(st, st.pending + st.detok.flush())
            st.pending = ""

    @staticmethod
    def _emit(st: ChoiceState, text: str) -> None:
        if text:
            st.new_text.append(text)

    def delta(self, seq: Sequence, prompt_tokens: int) -> RequestOutput | None:
        """What the choice produced since the last delta (None if nothing, unless it finished)."""
        st: ChoiceState = seq.out
        if not st.new_ids and not st.new_text and seq.finish_reason is None:
            return None
        out = RequestOutput(
            request_id=seq.request_id, index=seq.index, token_ids=st.new_ids, text="".join(st.new_text),
            logprobs=st.new_logprobs if seq.params.logprobs is not None else None,
            finish_reason=seq.finish_reason, stop_reason=seq.stop_reason, prompt_tokens=prompt_tokens,
            completion_tokens=seq.num_output, cached_tokens=seq.num_cached, model=seq.model,
            fingerprint=seq.fingerprint)
        st.new_ids, st.new_text, st.new_logprobs = [], [], []
        return out
