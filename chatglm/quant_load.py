"""Quantization inside checkpoint.load_model: pre-quantized THUDM folders and quantize-at-load."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from chatglm.quantize import (QuantizedLinear, QuantKernel, QuantMode, quantize_linear, quantized_module_names,
                              swap_in_empty_quantized)


log = logging.getLogger(__name__)


class LoadQuantizer:
    """Hooks load_model calls: before_load (model on meta), assign (each raw tensor, optional),
    after_shard (after each weight file), after_load (model on its device)."""

    def __init__(self, mode: QuantMode, prequantized: bool, kernel: QuantKernel | None = None,
                 include_output_layer: bool = False) -> None:
        self.mode, self.prequantized, self.kernel = mode, prequantized, kernel
        self.include_output_layer = include_output_layer
        self._targets: set[str] | None = None

    @classmethod
    def for_folder(cls, quantize: QuantMode | str | int | None, config, folder: Path | str,
                   kernel: QuantKernel | None = None) -> "LoadQuantizer":
        requested = QuantMode.parse(quantize)
        stored = QuantMode.parse(int(config.quantization_bit or 0))
        if stored is not QuantMode.NONE:
            if requested not in (QuantMode.NONE, stored):
                raise ValueError(f"{folder} holds {stored.name} weights (config quantization_bit="
                                 f"{stored.bits}); it cannot be loaded as {requested.name}")
            return cls(stored, prequantized=True, kernel=kernel)
        return cls(requested, prequantized=False, kernel=kernel)

    def targets(self, model: nn.Module) -> list[str]:
        return quantized_module_names(model, self.include_output_layer)

    def before_load(self, model: nn.Module) -> None:
        if self.prequantized:  # THUDM's weight (int8) + weight_scale (fp16) + bias load straight in
            swap_in_empty_quantized(model, self.mode, dtype=torch.float16, device="meta",
                                    include_output_layer=self.include_output_layer)

    def assign(self, model: nn.Module, key: str, tensor: torch.Tensor) -> bool:
        """Quantize a float `...weight` of a target linear straight from the checkpoint tensor
        (exact even when the model dtype is bf16). True if handled; the caller skips it then."""
        if self.prequantized or self.mode is QuantMode.NONE or not key.endswith(".weight"):
            return False
        name = key[: -len(".weight")]
        if self._targets is None:
            self._targets = set(self.targets(model))
        if name not in self._targets:
            return False
        old = model.get_submodule(name)
        layer = QuantizedLinear(old.in_features, old.out_features, self.mode, bias=old.bias is not None,
                                dtype=old.bias.dtype if old.bias is not None else torch.float16, device="meta")
        if old.bias is not None and not old.bias.is_meta:  # else _assign fills the meta bias later
            layer.bias = old.bias
        layer.set_float_weight(tensor)
        _set_submodule(model, name, layer)
        return True

    @torch.no_grad()
    def after_shard(self, model: nn.Module) -> None:
        """Quantize every target nn.Linear whose float weight has arrived, freeing it at once."""
        if self.prequantized or self.mode is QuantMode.NONE:
            return
        for name in self.targets(model):
            old = model.get_submodule(name)
            if isinstance(old, QuantizedLinear) or old.weight is None or old.weight.is_meta:
                continue
            if old.bias is not None and old.bias.is_meta:
                continue  # its bias is in a later shard
            _set_submodule(model, name, quantize_linear(old, self.mode))
            old.weight = None

    @torch.no_grad()
    def after_load(self, model: nn.Module, device: torch.device) -> None:
        if self.mode is QuantMode.NONE:
            return
        self.after_shard(model)
        for name in self.targets(model):
            layer = model.get_submodule(name)
            if not isinstance(layer, QuantizedLinear):
                raise RuntimeError(f"{name} was not quantized during loading")
            if layer.weight_scale.dtype == torch.bfloat16:
                log.warning("%s: weight_scale was cast to bf16 while loading; THUDM's fp16 scales lost bits", name)
            if layer.weight_scale.dtype != torch.float16:  # a loader that cast it: fp32 -> fp16 is exact
                layer.weight_scale = nn.Parameter(layer.weight_scale.to(torch.float16), requires_grad=False)
            layer.to(device)
            layer.prepare(self.kernel)
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "quantization_bit"):
            config.quantization_bit = self.mode.bits


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
