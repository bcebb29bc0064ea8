"""What the engine streams back to a request: one RequestOutput per step that produced something."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .sampling import SamplingParams


class FinishReason(str, Enum):
    STOP = "stop"  # eos, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or max_model_len
    ABORT = "abort"  # client went away or the server is shutting down


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    token: str  # the token's text as decoded alone (may be "" or partial UTF-8 shown as bytes)
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (id, text, logprob), best first


@dataclass(slots=True)
class RequestOutput:
    """A delta for one choice of one request."""

    request_id: str
    index: int  # choice index: 0..n-1, or the adapter's position in a fan-out request
    token_ids: list[int]  # new token ids since the last delta
    text: str  # new text since the last delta (UTF-8 safe, stop strings held back)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the matched stop string or token id
    prompt_tokens: int = 0
    completion_tokens: int = 0  # total so far for this choice
    cached_tokens: int = 0  # prompt tokens whose KV was reused
    model: str = ""  # the served model id for this choice (base name or adapter name)
    fingerprint: str = ""  # changes with base, quantization or adapter version

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class SequenceStatus(Enum):
    WAITING = "waiting"  # queued; holds no KV slot
    RUNNING = "running"  # owns a KV slot
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    """One choice of one request, as the engine schedules it (internal; never leaves the engine).

    The KV slot holds `prefix_len` adapter rows, then one row per token of `token_ids[:num_computed]`.
    """

    seq_id: int
    request_id: str
    index: int  # choice index in the request's stream
    token_ids: list[int]  # prompt, then output
    num_prompt: int
    params: SamplingParams
    cache_key: tuple  # (adapter int id, version) or () for the base model; KV is reused only within a key
    prefix_len: int = 0
    adapter: Any = None  # the adapter version whose prefix KV fills the slot's first rows (runner's business)
    model: str = ""
    fingerprint: str = ""
    status: SequenceStatus = SequenceStatus.WAITING
    slot: int = -1
    num_computed: int = 0  # tokens whose KV is in the slot
    num_cached: int = 0  # prompt tokens whose KV came from the prefix cache
    parent: "Sequence | None" = None  # n > 1: the sibling whose prefill this sequence shares
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    arrival_time: float = 0.0
    first_token_time: float | None = None
    generator: Any = None  # torch.Generator for seeded sampling
    out: Any = None  # the output processor's per-choice state

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt:]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def kv_rows(self) -> int:
        return self.prefix_len + self.num_computed
