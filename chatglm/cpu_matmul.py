"""Linear layers whose bf16/fp16 weights multiply in fp32 on CPUs without native half-precision GEMM.

On AVX2-only CPUs (no AVX512-BF16/AMX/AVX-NE-CONVERT) torch's bf16 GEMM is an emulated loop: about a
third of fp32's FLOP/s at large M, and 5-10x slower than fp32 already at M = 16 (docs/benchmarks.md,
"Versus transformers serve"). A GEMV of a few rows is memory-bound. So from
`UPCAST_MIN_ROWS` rows on, the weight is converted to fp32 one block of output rows at a time (a
block of ~2 MB stays in cache, so no full fp32 copy is ever written to memory) and multiplied in
fp32; the result is rounded once to the activation dtype. Weights stay bf16 in memory. Before that,
when the C++ extension is built, up to `GEMV_MAX_ROWS` rows (decode steps, batched or not) go to the
AVX2 kernel of chatglm/gemv_cpu.cpp, which reads each weight once and widens half-precision weights in
registers: at one row ~1.9x torch's bf16 GEMV and ~1.5x its fp32 GEMV, at 16 rows 1.3-2x both the
blocked path and torch's fp32 GEMM on this machine (docs/benchmarks.md). All paths accumulate in fp32,
so results agree to rounding.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

from .native import native_unavailable_reason

UPCAST_MIN_ROWS = int(os.environ.get("CHATGLM_UPCAST_MIN_ROWS", "4"))  # 0 disables the fp32 path
GEMV_MAX_ROWS = 24  # from ~32 rows the GEMMs (blocked or BLAS) are as fast here
BLOCK_BYTES = 2 << 20  # fp32 bytes of one converted weight block


@functools.cache
def native_half_gemm(dtype: torch.dtype) -> bool:
    """Whether this CPU has a fast GEMM for `dtype` (then the weights are used as they are)."""
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


def wants_fp32(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (UPCAST_MIN_ROWS > 0 and weight.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float16)
            and x.dim() > 0 and x.numel() >= UPCAST_MIN_ROWS * x.shape[-1] and not native_half_gemm(weight.dtype))


def wants_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (weight.dtype in (torch.bfloat16, torch.float16, torch.float32) and weight.device.type == "cpu"
            and x.dtype in (torch.bfloat16, torch.float32) and x.dim() > 0
            and 0 < x.numel() <= GEMV_MAX_ROWS * x.shape[-1] and weight.is_contiguous()
            and native_unavailable_reason() is None)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = torch.ops.chatglm_gemv.mv(x.reshape(-1, x.shape[-1]), weight, bias)  # [M, N]
    return y.reshape(*x.shape[:-1], weight.shape[0])


def blocked_fp32_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear in fp32 from half-precision weights, converting `weight` a row block at a time."""
    lead, k = x.shape[:-1], x.shape[-1]
    xt = x.reshape(-1, k).float().t()  # [K, M]
    n = weight.shape[0]
    rows = max(16, BLOCK_BYTES // (4 * k))
    yt = torch.empty(n, xt.shape[1], dtype=torch.float32, device=x.device)  # [N, M]
    for n0 in range(0, n, rows):
        torch.mm(weight[n0:n0 + rows].float(), xt, out=yt[n0:n0 + rows])
    y = yt.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype, memory_format=torch.contiguous_format).reshape(*lead, n)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) with the fp32 paths above where they pay.

    The weight may be half precision under fp32 activations (the server keeps a half-precision
    checkpoint's output layer so, see `load_model(half_vocab_weights=...)`): it is then multiplied in
    fp32 after an exact conversion and the result is fp32.
    """

    def block_spec(self, x: torch.Tensor) -> tuple | None:
        """(weight, scale, bias, bits) for chatglm_block's ops when this layer would run `x` (inference)
        through the GEMV kernel, else None."""
        return (self.weight, None, self.bias, 0) if wants_gemv(x, self.weight) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            if wants_gemv(x, self.weight):
                return gemv(x, self.weight, self.bias)
            if wants_fp32(x, self.weight):
                return blocked_fp32_linear(x, self.weight, self.bias)
            if x.dtype == torch.float32 and self.weight.dtype != x.dtype:
                return blocked_fp32_linear(x, self.weight, self.bias)
        if self.weight.dtype != x.dtype:
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return F.linear(x, self.weight, self.bias)
