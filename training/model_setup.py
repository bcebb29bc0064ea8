"""The module the Trainer trains: a frozen ChatGLM2 base plus a trainable P-Tuning v2 prefix
encoder (or, without --pre_seq_len, the whole base), set up in THUDM's order (reference §6.2)."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from chatglm.checkpoint import load_model, load_prefix_encoder
from chatglm.config import ChatGLMConfig
from chatglm.model import ChatGLM
from chatglm.prefix import PrefixEncoder, PrefixKV

from chatglm.quant_format import QuantMode

from .arguments import ModelArguments
from .data import IGNORE_INDEX

PREFIX_DROPOUT = 0.1  # THUDM's ChatGLMModel.dropout on the prefix K/V


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """THUDM's loss: fp32 logits[:, :-1] against labels[:, 1:], mean over labels != -100."""
    # logits [B, T, V]; labels [B, T]
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)


class PTuningModel(nn.Module):
    """Trainer-facing module: `forward(input_ids, labels, ...) -> {"loss", "logits"}`.

    With a prefix encoder the base is frozen and the prefix K/V (dropout 0.1 per batch row in train
    mode, as THUDM) enter every layer's attention; without one the base itself trains.
    """

    def __init__(self, base: ChatGLM, prefix_encoder: PrefixEncoder | None):
        super().__init__()
        self.base = base
        self.prefix_encoder = prefix_encoder
        self.prefix_dropout = nn.Dropout(PREFIX_DROPOUT)

    @property
    def glm_config(self) -> ChatGLMConfig:
        return self.base.config

    def prefix(self, batch: int) -> PrefixKV | list[PrefixKV] | None:
        """Per-row prefix K/V (per-row dropout masks, like THUDM's expand-then-dropout)."""
        if self.prefix_encoder is None:
            return None
        flat = self.prefix_encoder().to(self.base.dtype)  # [P, kv_size]
        if not self.training:
            return PrefixKV.from_flat(flat, self.glm_config)
        rows = self.prefix_dropout(flat.unsqueeze(0).expand(batch, -1, -1))  # [B, P, kv_size]
        return [PrefixKV.from_flat(rows[b], self.glm_config) for b in range(batch)]

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        # input_ids, labels, attention_mask, position_ids [B, T]
        logits = self.base(input_ids, attention_mask, position_ids, prefix=self.prefix(input_ids.shape[0]))
        out = {"logits": logits}  # [B, T, V]
        if labels is not None:
            out["loss"] = causal_lm_loss(logits, labels)
        return out

    def activation_checkpointing_enable(self, **_: object) -> None:
        """Called by the Trainer for --gradient_checkpointing; training turns it on anyway."""
        self.base.transformer.gradient_checkpointing = True

    gradient_checkpointing_enable = activation_checkpointing_enable


def base_dtype(model_args: ModelArguments, device: torch.device, bf16: bool) -> torch.dtype:
    """fp32 for full fine-tuning (THUDM's model.float()); for P-tuning THUDM's model.half() on a
    GPU, bf16 with --bf16, and fp32 on a CPU (fp16 matmuls there are slow or missing)."""
    if model_args.pre_seq_len is None:
        return torch.float32
    if bf16:
        return torch.bfloat16
    return torch.float16 if device.type == "cuda" else torch.float32


def trained_config(model: PTuningModel, quantization: QuantMode) -> ChatGLMConfig:
    """The config.json a checkpoint records: pre_seq_len/prefix_projection and the quantization trained on."""
    enc = model.prefix_encoder
    return dataclasses.replace(
        model.glm_config,
        pre_seq_len=enc.pre_seq_len if enc is not None else None,
        prefix_projection=enc.prefix_projection if enc is not None else False,
        quantization_bit=quantization.bits or model.glm_config.quantization_bit,
    )


def build_model(model_args: ModelArguments, device: torch.device, bf16: bool = False) -> PTuningModel:
    """Load the base (quantized if asked), freeze it, and attach a fresh or loaded prefix encoder.

    Call after transformers.set_seed: a fresh encoder keeps torch's default init (Embedding N(0, 1)),
    as THUDM's does.
    """
    quant = model_args.quantization
    if model_args.pre_seq_len is None and quant is not QuantMode.NONE:
        raise ValueError("--quantization_bit needs --pre_seq_len: a quantized base cannot be fully fine-tuned")
    dtype = base_dtype(model_args, device, bf16)
    base = load_model(model_args.model_name_or_path, dtype=dtype, device=device,
                      quantize=None if quant is QuantMode.NONE else quant)
    base.transformer.gradient_checkpointing = True  # THUDM: gradient_checkpointing_enable() always
    if model_args.pre_seq_len is None:
        for p in base.parameters():
            p.requires_grad_(True)
        return PTuningModel(base, None)
    for p in base.parameters():
        p.requires_grad_(False)
    if model_args.ptuning_checkpoint is not None:
        encoder = load_prefix_encoder(model_args.ptuning_checkpoint, base.config)
        if (encoder.pre_seq_len, encoder.prefix_projection) != (model_args.pre_seq_len, model_args.prefix_projection):
            raise ValueError(
                f"--ptuning_checkpoint {model_args.ptuning_checkpoint} has pre_seq_len {encoder.pre_seq_len}, "
                f"prefix_projection {encoder.prefix_projection}; the command line says {model_args.pre_seq_len}, "
                f"{model_args.prefix_projection}")
    else:
        encoder = PrefixEncoder(base.config, model_args.pre_seq_len, model_args.prefix_projection)
    if dtype == torch.float16:  # THUDM's model.half() then prefix_encoder.float() rounds the prefix once
        encoder.half()
    encoder.float().to(device)
    return PTuningModel(base, encoder)


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
