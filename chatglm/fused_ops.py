"""Per-layer small ops (RMSNorm, rotary, SwiGLU, decode attention) as single C++ calls.

The fused versions (chatglm/fused_cpu.cpp) run on CPU tensors in inference (no autograd) with
float32 or bfloat16 activations; anything else, or a machine where the extension cannot be built,
gets the eager code. Set CHATGLM_FUSED=0 to always use the eager code.
"""
from __future__ import annotations

import functools
import os

import torch

from .native import native_unavailable_reason


@functools.cache
def fused_available() -> bool:
    return os.environ.get("CHATGLM_FUSED", "1") != "0" and native_unavailable_reason() is None


def use_fused(*tensors: torch.Tensor) -> bool:
    """Whether the fused ops may replace the eager ones for these tensors."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return (all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.bfloat16) for t in tensors)
            and fused_available())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.ops.chatglm_fused.rms_norm(x, weight, eps)


def rotary_(qkv: torch.Tensor, rope: torch.Tensor, rotated_heads: int, head_dim: int) -> torch.Tensor:
    """Rotate in place the first `rotated_heads` heads of qkv [*lead, (H + 2G) * D] (q, then k)."""
    return torch.ops.chatglm_fused.rotary_(qkv, rope, rotated_heads, head_dim)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for h [*lead, 2F] holding gate then up."""
    return torch.ops.chatglm_fused.swiglu(h)


def decode_attention_(k_cache: torch.Tensor, v_cache: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """One decode token per sequence: write k, v [N, G, D] at (slots, rows) of the caches
    [num_slots, capacity, G, D], then attend q [N, H, D] over rows 0..rows[i] of each slot -> [N, H, D]."""
    return torch.ops.chatglm_fused.decode_attention_(k_cache, v_cache, q, k, v, slots, rows)
