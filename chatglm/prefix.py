"""P-Tuning v2: the trainable prefix encoder and the per-layer key/value prefix it produces."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import ChatGLMConfig


class PrefixEncoder(nn.Module):
    """THUDM's encoder: Embedding(P, kv_size), optionally followed by Linear-Tanh-Linear.

    Parameter names (`embedding`, `trans.0`, `trans.2`) match the `transformer.prefix_encoder.*`
    keys of a THUDM P-Tuning v2 checkpoint.
    """

    def __init__(self, config: ChatGLMConfig, pre_seq_len: int, prefix_projection: bool = False):
        super().__init__()
        self.pre_seq_len = pre_seq_len
        self.prefix_projection = prefix_projection
        kv_size = config.kv_size
        self.embedding = nn.Embedding(pre_seq_len, kv_size)
        if prefix_projection:
            self.trans = nn.Sequential(
                nn.Linear(kv_size, config.hidden_size), nn.Tanh(), nn.Linear(config.hidden_size, kv_size)
            )
        else:
            self.trans = None

    def forward(self) -> torch.Tensor:
        flat = self.embedding.weight  # [P, kv_size]
        if self.trans is not None:
            flat = self.trans(flat)  # [P, kv_size]
        return flat


@dataclass
class PrefixKV:
    """The serving view of an adapter: K/V for every layer, never rotated.

    `kv` is [num_layers, 2, pre_seq_len, groups, kv_channels]; index 0 of dim 1 is K, 1 is V.
    """

    kv: torch.Tensor

    @classmethod
    def from_flat(cls, flat: torch.Tensor, config: ChatGLMConfig) -> "PrefixKV":
        # THUDM's flat layout: index ((2*layer + kv) * groups + group) * kv_channels + channel.
        P = flat.shape[0]
        kv = flat.view(P, config.num_layers, 2, config.num_kv_groups, config.kv_channels)  # [P, L, 2, G, D]
        return cls(kv.permute(1, 2, 0, 3, 4))  # [L, 2, P, G, D]

    @classmethod
    def from_encoder(cls, encoder: PrefixEncoder, config: ChatGLMConfig) -> "PrefixKV":
        return cls.from_flat(encoder(), config)

    @property
    def pre_seq_len(self) -> int:
        return self.kv.shape[2]

    @property
    def num_bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def to(self, *args, **kwargs) -> "PrefixKV":
        return PrefixKV(self.kv.to(*args, **kwargs))

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv[i, 0], self.kv[i, 1]  # each [P, G, D]


def num_prefix_parameters(config: ChatGLMConfig, pre_seq_len: int, prefix_projection: bool = False) -> int:
    n = pre_seq_len * config.kv_size
    if prefix_projection:
        n += 2 * config.kv_size * config.hidden_size + config.hidden_size + config.kv_size
    return n
