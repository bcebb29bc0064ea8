"""Limits and knobs of the serving engine (one typed record; the CLI maps its flags onto it)."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch


class AdapterLoading(str, Enum):
    EAGER = "eager"  # load every adapter found at startup
    LAZY = "lazy"  # load on first use


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def auto_dtype(quantize: str | int | None, device: str, checkpoint_dtype: str | None = None) -> torch.dtype:
    """The serving dtype when the operator names none.

    GPU: bf16. CPU, quantized: fp32 activations for the AVX2 int8/int4 kernel, bf16 when only aten's
    kernels (which want bf16) are there. CPU, not quantized: the checkpoint's own precision, so an
    fp32 checkpoint stays exact and a half-precision one (THUDM publishes fp16) takes half the memory
    as bf16; chatglm's linears multiply bf16 weights in fp32 blocks from 4 rows up, so bf16 costs no
    speed on CPUs without native bf16 (measured in docs/benchmarks.md, "Engine")."""
    if torch.device(device).type != "cpu":
        return torch.bfloat16
    from chatglm.quant_format import QuantMode
    from chatglm.quant_kernels import QuantKernel, default_kernel

    mode = QuantMode.parse(quantize)
    if mode is QuantMode.NONE:
        return torch.bfloat16 if checkpoint_dtype in ("float16", "bfloat16") else torch.float32
    return torch.float32 if default_kernel(mode, device) is QuantKernel.CPU_AVX2 else torch.bfloat16


@dataclass
class EngineConfig:
    max_num_seqs: int = 64  # sequences decoding at once
    max_num_batched_tokens: int = 2048  # tokens per step (decode tokens + prefill chunks)
    max_model_len: int = 2048  # prompt + output tokens of one sequence (adapter prefix not counted)
    max_prefix_len: int = 128  # largest adapter pre_seq_len the KV slots leave room for
    # KV memory: a budget in tokens or bytes (the smaller wins); None means one slot per sequence.
    kv_budget_tokens: int | None = None
    kv_budget_bytes: int | None = None
    max_waiting: int = 256  # queued requests before generate() raises Overloaded
    max_resident_adapters: int = 64
    adapter_loading: AdapterLoading = AdapterLoading.LAZY
    watch_adapters: bool = True  # reload an adapter whose files changed on disk (checked per request)
    dtype: torch.dtype = torch.float32  # activations and KV (int8/int4 weights keep their own packing)
    kv_dtype: torch.dtype | None = None  # None: same as dtype
    device: str = "cpu"
    seed: int = 0  # for requests without a seed
    max_logprobs: int = 20
    huge_pages: bool = True  # CPU: move the weights onto transparent huge pages at startup

    def __post_init__(self) -> None:
        self.dtype = parse_dtype(self.dtype)
        self.kv_dtype = parse_dtype(self.kv_dtype) if self.kv_dtype is not None else self.dtype
        self.adapter_loading = AdapterLoading(self.adapter_loading)
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "max_waiting"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_prefix_len < 0:
            raise ValueError(f"max_prefix_len must be >= 0, got {self.max_prefix_len}")

    @property
    def slot_capacity(self) -> int:
        """KV rows of one sequence: its adapter prefix, then prompt and output tokens."""
        return self.max_prefix_len + self.max_model_len

    def num_slots(self, bytes_per_token: int) -> int:
        """How many sequences' KV fit the budget (at least one)."""
        n = self.max_num_seqs
        if self.kv_budget_tokens is not None:
            n = self.kv_budget_tokens // self.slot_capacity
        if self.kv_budget_bytes is not None:
            n = min(n, self.kv_budget_bytes // (bytes_per_token * self.slot_capacity))
        if n < 1:
            raise ValueError(f"the KV budget does not hold one sequence of {self.slot_capacity} tokens "
                             f"(max_model_len {self.max_model_len} + max_prefix_len {self.max_prefix_len})")
        return n
