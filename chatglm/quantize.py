"""Weight-only int8/int4 quantization of ChatGLM2 linears in THUDM's format (chatglm2-6b-int4 layout)."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from torch import nn

from chatglm.quant_format import (QuantMode, dequantize_weight, int_weight, pack_int4, quantize_weight,
                                  unpack_int4)
from chatglm.quant_kernels import (QuantKernel, QuantKernelError, check_kernel, default_kernel, prepare,
                                   run, tinygemm_bytes)

__all__ = [
    "QuantMode", "QuantKernel", "QuantKernelError", "QuantizedLinear", "THUDM_QUANTIZED_SUFFIXES",
    "OUTPUT_LAYER_SUFFIX", "check_kernel", "default_kernel", "dequantize_weight", "empty_quantized_linear",
    "int_weight", "pack_int4", "quantize_linear", "quantize_model", "quantized_module_names",
    "quantize_weight", "save_quantized", "swap_in_empty_quantized", "tinygemm_bytes", "unpack_int4",
]

# The layers THUDM's quantize() replaces; embedding, norms, output layer and prefix encoder stay float.
THUDM_QUANTIZED_SUFFIXES = ("self_attention.query_key_value", "self_attention.dense",
                            "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
OUTPUT_LAYER_SUFFIX = "output_layer"


class _QuantMatmul(torch.autograd.Function):
    """Fast kernel forward; backward gives the input gradient through the dequantized weight."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "QuantizedLinear") -> torch.Tensor:
        ctx.layer = layer
        return layer._matmul(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        layer = ctx.layer
        w = dequantize_weight(layer.weight, layer.weight_scale, layer.bits).to(grad.dtype)  # [out, in]
        return grad @ w, None


class QuantizedLinear(nn.Module):
    """y = x @ dequant(weight).T + bias with THUDM's state-dict names: weight (int8), weight_scale (fp16), bias.

    Weights are frozen; the input gradient flows (P-Tuning v2 trains through it). `kernel` picks the
    matmul; its repacked tensors are built lazily and never saved.
    """

    def __init__(self, in_features: int, out_features: int, mode: QuantMode | str | int, bias: bool = True,
                 dtype: torch.dtype = torch.float16, device: torch.device | str | None = None,
                 kernel: QuantKernel | None = None) -> None:
        super().__init__()
        self.mode = QuantMode.parse(mode)
        if self.mode is QuantMode.NONE:
            raise ValueError("QuantizedLinear needs mode INT8 or INT4, got NONE")
        if self.mode is QuantMode.INT4 and in_features % 2:
            raise ValueError(f"int4 packs two columns a byte: in_features must be even, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        cols = in_features * self.bits // 8
        self.weight = nn.Parameter(torch.empty(out_features, cols, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, dtype=torch.float16, device=device),
                                         requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None
        self._kernel = kernel
        self._packed: dict | None = None

    @property
    def bits(self) -> int:
        return self.mode.bits

    @property
    def kernel(self) -> QuantKernel:
        if self._kernel is None:
            self._kernel = default_kernel(self.mode, self.weight.device)
        return self._kernel

    @kernel.setter
    def kernel(self, kernel: QuantKernel | None) -> None:
        self._kernel, self._packed = kernel, None

    def prepare(self, kernel: QuantKernel | None = None) -> "QuantizedLinear":
        """Select `kernel` (default: fastest for the device), check it, build its packed tensors now."""
        if kernel is not None:
            self.kernel = kernel
        check_kernel(self.kernel, self.mode, self.weight.device)
        self._packed = prepare(self.kernel, self.weight, self.weight_scale, self.bits)
        return self

    @torch.no_grad()
    def set_float_weight(self, weight: torch.Tensor) -> None:
        """Quantize a float [out, in] weight (THUDM-exact, from its fp16 cast) into this layer."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight shape {tuple(weight.shape)} != ({self.out_features}, {self.in_features})")
        device = weight.device if self.weight.is_meta else self.weight.device
        q, scale = quantize_weight(weight.to(device), self.bits)
        self.weight = nn.Parameter(q, requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)
        self._packed = None

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None:
            self.prepare()
        x2 = x.reshape(-1, self.in_features)  # [M, in]
        y = run(self.kernel, x2, self.weight, self.weight_scale, self.bias, self.bits, self._packed)
        return y.reshape(*x.shape[:-1], self.out_features)

    def block_spec(self, x: torch.Tensor) -> tuple | None:
        """(weight, scale, bias, bits) for chatglm_block's ops when this layer runs `x` (fp32/bf16, CPU,
        inference) through the AVX2 kernel, else None."""
        if self._packed is None:
            self.prepare()
        if self.kernel is not QuantKernel.CPU_AVX2 or x.dtype not in (torch.float32, torch.bfloat16):
            return None
        return self.weight, self._packed["scale"], self.bias, self.bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _QuantMatmul.apply(x, self)
        return self._matmul(x)

    def _apply(self, fn, recurse: bool = True):
        # Keep weight_scale fp16 under .half()/.float()/.to(dtype): THUDM's format is fp16 scales and
        # a bf16 round trip would lose bits. Device moves still apply; packed tensors are rebuilt.
        scale = self.weight_scale.data  # .data: _apply may swap the Parameter's tensor in place
        super()._apply(fn, recurse)
        if self.weight_scale.dtype != scale.dtype:
            self.weight_scale = nn.Parameter(scale.to(self.weight_scale.device), requires_grad=False)
        self._packed = None
        return self

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._packed = None

    def extra_repr(self) -> str:
        kernel = self._kernel.name if self._kernel else "auto"
        return (f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode.name}, "
                f"bias={self.bias is not None}, kernel={kernel}")


def empty_quantized_linear(in_features: int, out_features: int, bias: bool, mode: QuantMode | str | int,
                           dtype: torch.dtype = torch.float16, device: torch.device | str | None = None,
                           kernel: QuantKernel | None = None) -> QuantizedLinear:
    """Uninitialized QuantizedLinear for loading a pre-quantized state dict (bias in `dtype`)."""
    return QuantizedLinear(in_features, out_features, mode, bias=bias, dtype=dtype, device=device, kernel=kernel)


@torch.no_grad()
def quantize_linear(linear: nn.Linear, mode: QuantMode | str | int,
                    kernel: QuantKernel | None = None) -> QuantizedLinear:
    """THUDM-exact quantization of an nn.Linear (from its fp16 cast); the bias keeps its dtype."""
    has_bias = linear.bias is not None
    dtype = linear.bias.dtype if has_bias else linear.weight.dtype
    layer = QuantizedLinear(linear.in_features, linear.out_features, mode, bias=has_bias, dtype=dtype,
                            device=linear.weight.device, kernel=kernel)
    layer.set_float_weight(linear.weight)
    if has_bias:
        layer.bias.copy_(linear.bias)
    return layer


def quantized_module_names(model: nn.Module, include_output_layer: bool = False) -> list[str]:
    """Names of the nn.Linear / QuantizedLinear modules THUDM's quantize() would replace."""
    suffixes = THUDM_QUANTIZED_SUFFIXES + ((OUTPUT_LAYER_SUFFIX,) if include_output_layer else ())
    return [name for name, mod in model.named_modules()
            if isinstance(mod, (nn.Linear, QuantizedLinear)) and name.endswith(suffixes)]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _record_bits(model: nn.Module, mode: QuantMode) -> None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_bit"):
        config.quantization_bit = mode.bits  # a saved config then records it, as THUDM's does


@torch.no_grad()
def quantize_model(model: nn.Module, mode: QuantMode | str | int, kernel: QuantKernel | None = None,
                   include_output_layer: bool = False) -> nn.Module:
    """Swap THUDM's quantized linears for QuantizedLinear in place, freeing each float weight as it goes."""
    mode = QuantMode.parse(mode)
    if mode is QuantMode.NONE:
        return model
    for name in quantized_module_names(model, include_output_layer):
        old = model.get_submodule(name)
        if isinstance(old, QuantizedLinear):
            if old.mode is not mode:
                raise ValueError(f"{name} is already quantized as {old.mode.name}, cannot requantize to {mode.name}")
            continue
        new = quantize_linear(old, mode, kernel)
        _set_submodule(model, name, new)
        old.weight = None  # drop the float weight now: peak memory stays one layer above the result
        if kernel is not None:
            new.prepare(kernel)
    _record_bits(model, mode)
    return model


def swap_in_empty_quantized(model: nn.Module, mode: QuantMode | str | int, dtype: torch.dtype,
                            device: torch.device | str | None = None, include_output_layer: bool = False,
                            kernel: QuantKernel | None = None) -> list[str]:
    """Replace the target linears (e.g. on meta) by empty QuantizedLinear, ready for load_state_dict
    of a THUDM-quantized checkpoint or for set_float_weight. Returns the replaced module names."""
    mode = QuantMode.parse(mode)
    names = quantized_module_names(model, include_output_layer) if mode is not QuantMode.NONE else []
    for name in names:
        old = model.get_submodule(name)
        if isinstance(old, QuantizedLinear):
            continue
        dev = device if device is not None else old.weight.device
        _set_submodule(model, name, empty_quantized_linear(old.in_features, old.out_features, old.bias is not None,
                                                           mode, dtype=dtype, device=dev, kernel=kernel))
    _record_bits(model, mode)
    return names


def save_quantized(src: str | Path, dst: str | Path, mode: QuantMode | str | int, safetensors: bool = False) -> None:
    """Quantize a ChatGLM2 folder once and save THUDM's quantized layout (config quantization_bit,
    weight + weight_scale tensors, fp16 elsewhere) with the tokenizer files next to it."""
    from chatglm.checkpoint import load_model, save_model  # the model layer sits above this module

    src, dst = Path(src), Path(dst)
    model = load_model(src, dtype=torch.float16, device="cpu", quantize=QuantMode.parse(mode).bits)
    save_model(model, dst, safetensors=safetensors)
    for f in src.iterdir():  # tokenizer and generation files; weights, config and .py files are not copied
        weights = f.suffix in (".bin", ".safetensors") or f.name.endswith(".index.json")
        if f.is_file() and not weights and f.suffix != ".py" and not (dst / f.name).exists():
            shutil.copy2(f, dst / f.name)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m chatglm.quantize",
                                description="Save a quantized copy of a ChatGLM2 folder in THUDM's layout.")
    p.add_argument("--model", required=True, help="source folder (fp16/fp32, as published)")
    p.add_argument("--out", required=True, help="destination folder")
    p.add_argument("--bits", type=int, choices=[4, 8], required=True)
    p.add_argument("--safetensors", action="store_true",
                   help="write model.safetensors instead of pytorch_model.bin (chatglm2-6b-int4 uses .bin)")
    args = p.parse_args(argv)
    save_quantized(args.model, args.out, args.bits, safetensors=args.safetensors)
    print(f"wrote int{args.bits} model to {args.out}")


if __name__ == "__main__":
    main()
