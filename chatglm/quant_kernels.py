"""Matmul kernels for THUDM-format quantized weights: a dequantize reference plus CPU/CUDA fast paths."""
from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F

from chatglm.native import native_unavailable_reason
from chatglm.quant_format import QuantMode, dequantize_weight, unpack_int4


class QuantKernel(Enum):
    DEQUANT = "dequant"  # reference: fp16(q * scale) -> activation dtype, F.linear; any device
    CPU_AVX2 = "cpu_avx2"  # quant_cpu.cpp: fused AVX2 kernel on THUDM's layout, no repacked copy
    CPU_INT8 = "cpu_int8"  # aten._weight_int8pack_mm, bf16 activations
    CPU_INT4 = "cpu_int4"  # aten._weight_int4pack_mm_for_cpu after a lossless repack
    CUDA_TORCH = "cuda_torch"  # aten._weight_int4pack_mm (int4); int8: cuBLAS on the int8 values widened to
    # bf16 (exact) with the row scale applied after, or dequantize + cuBLAS for fp32/fp16 activations


class QuantKernelError(ValueError):
    pass


def unsupported_reason(kernel: QuantKernel, mode: QuantMode, device: torch.device) -> str | None:
    """Why `kernel` cannot run `mode` on `device`, or None if it can."""
    device = torch.device(device)
    if mode is QuantMode.NONE:
        return "there are no quantized weights to multiply"
    if kernel is QuantKernel.DEQUANT:
        return None
    if kernel in (QuantKernel.CPU_AVX2, QuantKernel.CPU_INT8, QuantKernel.CPU_INT4) and device.type != "cpu":
        return "it is a CPU kernel"
    if kernel is QuantKernel.CUDA_TORCH and device.type != "cuda":
        return "it is a CUDA kernel"
    if kernel is QuantKernel.CPU_INT8 and mode is not QuantMode.INT8:
        return "it multiplies int8 weights only"
    if kernel is QuantKernel.CPU_INT4 and mode is not QuantMode.INT4:
        return "it multiplies int4 weights only"
    if kernel is QuantKernel.CPU_AVX2:
        return native_unavailable_reason()
    return None


def check_kernel(kernel: QuantKernel, mode: QuantMode, device: torch.device | str) -> None:
    reason = unsupported_reason(kernel, mode, torch.device(device))
    if reason is not None:
        raise QuantKernelError(f"quantization kernel {kernel.name} cannot run mode {mode.name} "
                               f"on device {torch.device(device)}: {reason}")


def default_kernel(mode: QuantMode, device: torch.device | str) -> QuantKernel:
    """Fastest kernel available for `mode` on `device`."""
    device = torch.device(device)
    if device.type == "cpu":
        fallback = QuantKernel.CPU_INT8 if mode is QuantMode.INT8 else QuantKernel.CPU_INT4
        candidates = [QuantKernel.CPU_AVX2, fallback]
    elif device.type == "cuda":
        candidates = [QuantKernel.CUDA_TORCH]
    else:
        candidates = [QuantKernel.DEQUANT]
    for kernel in candidates:
        if unsupported_reason(kernel, mode, device) is None:
            return kernel
    check_kernel(candidates[-1], mode, device)  # raises with the reason
    raise AssertionError("unreachable")


def tinygemm_bytes(qweight: torch.Tensor) -> torch.Tensor:
    """THUDM int4 bytes -> uint8 (q[2j]+8) << 4 | (q[2j+1]+8), the layout _convert_weight_to_int4pack takes."""
    return qweight.view(torch.uint8) ^ 0x88  # flipping each nibble's sign bit adds 8 mod 16


def _pick_group(k: int) -> int:
    return next(g for g in (128, 64, 32) if k % g == 0)


def prepare(kernel: QuantKernel, weight: torch.Tensor, scale: torch.Tensor, bits: int) -> dict:
    """Kernel-specific tensors derived from THUDM's (weight, scale); never part of a state dict."""
    n = weight.shape[0]
    packed = {"scale": scale.float()}  # exact per-row scale, applied in fp32 after the matmul
    if kernel is QuantKernel.CPU_INT8:
        packed["ones"] = torch.ones(n, dtype=torch.bfloat16, device=weight.device)
    elif kernel is QuantKernel.CPU_INT4:
        u = unpack_int4(weight).to(torch.int32) + 8  # [N, K] in 0..15
        k = u.shape[1]
        # aten wants N % 16 == 0 and K % 32 == 0: pad with u = 8, i.e. q = 0 (exact)
        u = F.pad(u, (0, -k % 32, 0, -n % 16), value=8)
        group = _pick_group(u.shape[1])
        packed["int4pack"] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 8)
        packed["group"] = group
        packed["k_pad"] = u.shape[1] - k
        # group scale 1 and zero 0: (u - 8) * 1 + 0 = q exactly in any activation dtype
        sz = torch.zeros(u.shape[1] // group, u.shape[0], 2)
        sz[..., 0] = 1.0
        packed["scale_zeros"] = sz
    elif kernel is QuantKernel.CUDA_TORCH and bits == 4 and weight.shape[1] * 2 % 128 == 0 and n % 8 == 0:
        k = weight.shape[1] * 2
        packed["int4pack"] = torch.ops.aten._convert_weight_to_int4pack(tinygemm_bytes(weight).contiguous(), 8)
        packed["group"] = 128
        sz = torch.zeros(k // 128, n, 2, dtype=torch.bfloat16, device=weight.device)
        sz[..., 0] = 1.0
        packed["scale_zeros"] = sz
    return packed


def _finish(y: torch.Tensor, packed: dict, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    y = y.float() * packed["scale"]
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)


def _dequant(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
             bits: int) -> torch.Tensor:
    w = dequantize_weight(weight, scale, bits).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def run(kernel: QuantKernel, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
        bias: torch.Tensor | None, bits: int, packed: dict) -> torch.Tensor:
    """x [M, K] -> [M, N] in x's dtype."""
    if kernel is QuantKernel.DEQUANT:
        return _dequant(x, weight, scale, bias, bits)
    if kernel is QuantKernel.CPU_AVX2:
        if x.dtype not in (torch.float32, torch.bfloat16):  # the kernel reads fp32 or bf16 activations
            return torch.ops.chatglm_quant.mm(x.float().contiguous(), weight, packed["scale"], bias, bits).to(x.dtype)
        return torch.ops.chatglm_quant.mm(x.contiguous(), weight, packed["scale"], bias, bits)
    if kernel is QuantKernel.CPU_INT8:
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), weight, packed["ones"])
        return _finish(y, packed, bias, x.dtype)
    if kernel is QuantKernel.CPU_INT4:
        xp = F.pad(x, (0, packed["k_pad"])) if packed["k_pad"] else x
        sz = packed["scale_zeros"].to(x.dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xp.contiguous(), packed["int4pack"], packed["group"], sz)
        return _finish(y[:, : weight.shape[0]], packed, bias, x.dtype)
    if kernel is QuantKernel.CUDA_TORCH:
        if bits == 8 and x.dtype == torch.bfloat16:
            # the row scale factors out of the dot product; |q| <= 127 is exact in bf16. (fp16 would
            # overflow on the unscaled sums, fp32 keeps the reference's fp16(q * scale) weights.)
            return _finish(F.linear(x, weight.to(x.dtype)), packed, bias, x.dtype)
        if "int4pack" not in packed:  # int8 in fp32/fp16, or an int4 shape tinygemm does not take
            return _dequant(x, weight, scale, bias, bits)
        y = torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16).contiguous(), packed["int4pack"],
                                               packed["group"], packed["scale_zeros"])
        return _finish(y, packed, bias, x.dtype)
    raise QuantKernelError(f"unknown quantization kernel {kernel!r}")

