"""What the engine streams back to a request: one RequestOutput per step that produced something."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


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
