"""Per-request sampling parameters (OpenAI names are mapped onto these in server/protocol.py)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 disables
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    seed: int | None = None
    n: int = 1
    logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token's logprob plus top-k
    repetition_penalty: float = 1.0  # THUDM/HF style: divide positive logits of seen tokens
    presence_penalty: float = 0.0  # OpenAI style
    frequency_penalty: float = 0.0  # OpenAI style

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# THUDM's chat()/stream_chat() defaults (temperature 0.8, top_p 0.8, and transformers' top_k 50).
THUDM_DEFAULTS = dict(temperature=0.8, top_p=0.8, top_k=50)
