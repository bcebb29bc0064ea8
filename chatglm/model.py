"""The ChatGLM2 transformer, with THUDM's module tree so state-dict keys load unchanged.

The model knows nothing of adapters, HTTP or scheduling: it embeds tokens, computes rotated
q/k/v, and lets an attention backend (chatglm/attention.py, or the engine's) attend.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import fused_ops
from .attention import AttentionBackend, DenseAttention, DenseKVCache
from .config import ChatGLMConfig
from .cpu_matmul import Linear
from .prefix import PrefixKV


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # THUDM: variance in fp32, scale and weight multiply in fp32, one rounding at the end.
        if fused_ops.use_fused(x, self.weight):
            return fused_ops.rms_norm(x, self.weight, self.eps)
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (self.weight * (x * torch.rsqrt(var + self.eps))).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin for ChatGLM2's rotary: only the first half of each head rotates, in interleaved pairs."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.rot_dim = config.kv_channels // 2
        self.max_positions = config.seq_length
        self._table: torch.Tensor | None = None

    def table(self, device: torch.device) -> torch.Tensor:
        if self._table is None or self._table.device != device:
            # Same arithmetic as THUDM in fp32: theta_i = 1/10000^(2i/rot_dim), angle = pos * theta.
            theta = 1.0 / (10000 ** (torch.arange(0, self.rot_dim, 2, dtype=torch.float32, device=device) / self.rot_dim))
            pos = torch.arange(self.max_positions, dtype=torch.float32, device=device)
            angles = torch.outer(pos, theta)  # [max_pos, rot_dim/2]
            self._table = torch.stack([angles.cos(), angles.sin()], dim=-1)  # [max_pos, rot_dim/2, 2]
        return self._table

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        if position_ids.numel() and int(position_ids.max()) >= self.max_positions:
            raise ValueError(f"position {int(position_ids.max())} is beyond seq_length {self.max_positions}")
        return self.table(position_ids.device)[position_ids]  # [*lead, rot_dim/2, 2]


def apply_rotary(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    # x [*lead, heads, D]; rope [*lead, R/2, 2] -> rotate pairs (2i, 2i+1) of the first R channels
    half = rope.shape[-2]
    rot, keep = x[..., : 2 * half], x[..., 2 * half:]
    rot = rot.float().unflatten(-1, (half, 2))  # [*lead, heads, R/2, 2]
    cos, sin = rope[..., 0].unsqueeze(-2), rope[..., 1].unsqueeze(-2)  # [*lead, 1, R/2]
    x0, x1 = rot[..., 0], rot[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2)
    return torch.cat([out.to(x.dtype), keep], dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_number: int):
        super().__init__()
        self.layer_number = layer_number
        self.num_heads = config.num_attention_heads
        self.num_groups = config.num_kv_groups
        self.head_dim = config.kv_channels
        qkv_out = (self.num_heads + 2 * self.num_groups) * self.head_dim
        self.query_key_value = Linear(config.hidden_size, qkv_out, bias=config.qkv_bias)
        self.dense = Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, attention: AttentionBackend) -> torch.Tensor:
        H, G, D = self.num_heads, self.num_groups, self.head_dim
        qkv = self.query_key_value(x)  # [*lead, (H + 2G) * D]
        if fused_ops.use_fused(qkv, rope) and qkv.is_contiguous():
            # one call rotates q and k in place (qkv is this layer's fresh output)
            q, k, v = self.heads(fused_ops.rotary_(qkv, rope, H + G, D))
        else:  # q and k heads rotate in one pass (half the ops: fewer GPU launches, less autograd graph)
            qk, v = qkv.split([(H + G) * D, G * D], dim=-1)
            q, k = apply_rotary(qk.unflatten(-1, (H + G, D)), rope).split([H, G], dim=-2)  # [*lead, H|G, D]
            v = v.unflatten(-1, (G, D))
        out = attention(self.layer_number, q, k, v)  # [*lead, H, D]
        return self.dense(out.flatten(-2))

    def heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """qkv [*lead, (H + 2G) * D] -> views q [*lead, H, D], k and v [*lead, G, D]."""
        H, G, D = self.num_heads, self.num_groups, self.head_dim
        q, k, v = qkv.split([H * D, G * D, G * D], dim=-1)
        return q.unflatten(-1, (H, D)), k.unflatten(-1, (G, D)), v.unflatten(-1, (G, D))


class MLP(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.dense_h_to_4h = Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=config.add_bias_linear)
        self.dense_4h_to_h = Linear(config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dense_h_to_4h(x)  # [*lead, 2 * ffn]: SwiGLU's gate first, then up
        if fused_ops.use_fused(h):
            return self.dense_4h_to_h(fused_ops.swiglu(h))
        gate, up = h.chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(gate) * up)


class GLMBlock(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_number: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.self_attention = SelfAttention(config, layer_number)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, attention: AttentionBackend) -> torch.Tensor:
        specs = self._fused_specs(x, rope)
        if specs is not None:  # the same kernels in two C++ calls around attention (block_cpu.cpp)
            return self._fused_forward(x, rope, attention, *specs)
        x = x + self.self_attention(self.input_layernorm(x), rope, attention)
        return x + self.mlp(self.post_attention_layernorm(x))

    def _fused_specs(self, x: torch.Tensor, rope: torch.Tensor) -> tuple | None:
        """The four linears' kernel arguments when the eager code would run every op of this block but
        attention through the C++ kernels (CPU inference; float linears at GEMV row counts), else None.
        Not under autograd: attention's output may need a gradient (a trainable prefix) though x has none."""
        if torch.is_grad_enabled() or not fused_ops.use_fused(
                x, rope, self.input_layernorm.weight, self.post_attention_layernorm.weight):
            return None
        attn, mlp = self.self_attention, self.mlp
        specs = tuple(m.block_spec(x) for m in (attn.query_key_value, attn.dense, mlp.dense_h_to_4h,
                                                 mlp.dense_4h_to_h))
        return None if None in specs else specs

    def _fused_forward(self, x, rope, attention, qkv, dense, up, down) -> torch.Tensor:
        a = self.self_attention
        H, G, D = a.num_heads, a.num_groups, a.head_dim
        qkv_out = torch.ops.chatglm_block.pre(x, self.input_layernorm.weight, self.input_layernorm.eps, *qkv,
                                              rope, H + G, D)  # [*lead, (H + 2G) * D], q and k rotated
        out = attention(a.layer_number, *a.heads(qkv_out))  # [*lead, H, D]
        return torch.ops.chatglm_block.post(x, out.flatten(-2), *dense, self.post_attention_layernorm.weight,
                                            self.post_attention_layernorm.eps, *up, *down)


class Encoder(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(config, i) for i in range(config.num_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)


class Embedding(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)


class ChatGLMModel(nn.Module):
    """`transformer.*` in THUDM's checkpoints."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.embedding = Embedding(config)
        self.rotary_pos_emb = RotaryEmbedding(config)
        self.encoder = Encoder(config)
        self.output_layer = Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.gradient_checkpointing = False

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                      attention: AttentionBackend) -> torch.Tensor:
        """input_ids, position_ids [*lead] -> final-normed hidden states [*lead, hidden]."""
        x = self.embedding.word_embeddings(input_ids)  # [*lead, hidden]
        x = x.to(self.encoder.final_layernorm.weight.dtype)  # a half-precision table under fp32 activations
        rope = self.rotary_pos_emb(position_ids)  # [*lead, R/2, 2]
        for layer in self.encoder.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, rope, attention, use_reentrant=False)
            else:
                x = layer(x, rope, attention)
        return self.encoder.final_layernorm(x)


class ChatGLM(nn.Module):
    """ChatGLM2 with its LM head (THUDM's ChatGLMForConditionalGeneration)."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.config = config
        self.transformer = ChatGLMModel(config)

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (the norms'; the two vocab-sized weights may stay half precision)."""
        return self.transformer.encoder.final_layernorm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.embedding.word_embeddings.weight.device

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.transformer.output_layer(hidden)  # [*lead, padded_vocab]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                prefix: PrefixKV | Sequence[PrefixKV | None] | None = None,
                cache: DenseKVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """input_ids [B, T] (left-padded) -> logits [B, T, padded_vocab] ([B, 1, V] with last_only).

        `prefix` is one PrefixKV for the batch or one per row (None for no adapter). A `cache`
        passed in is extended in place (pass the prefix only on its first call).
        """
        B, T = input_ids.shape
        new_mask = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                    else attention_mask.to(torch.bool))  # [B, T]
        store = cache is not None
        if cache is None or cache.length == 0:
            fresh = (DenseKVCache.from_prefix(self.config, B, prefix, self.dtype, input_ids.device)
                     if prefix is not None else DenseKVCache(self.config.num_layers))
            if cache is not None:
                cache.__dict__.update(fresh.__dict__)
            cache = fresh if cache is None else cache
        elif prefix is not None:
            raise ValueError("the cache already holds this batch's prefix; pass prefix only on the first call")
        if position_ids is None:
            base = cache.next_pos if cache.next_pos is not None else torch.zeros(B, dtype=torch.long, device=input_ids.device)
            position_ids = base[:, None] + (new_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, T]
        attention = DenseAttention(cache, new_mask, store=store)
        hidden = self.transformer.hidden_states(input_ids, position_ids, attention)  # [B, T, hidden]
        attention.commit()
        if last_only:
            hidden = hidden[:, -1:]
        return self.compute_logits(hidden)
