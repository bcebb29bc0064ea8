"""THUDM's ChatGLM2 weight-only quantization format: per-row symmetric int8/int4, fp16 scales."""
from __future__ import annotations

from enum import Enum

import torch


class QuantMode(Enum):
    NONE = 0
    INT8 = 8
    INT4 = 4

    @property
    def bits(self) -> int:
        return self.value

    @classmethod
    def parse(cls, value: "QuantMode | str | int | None") -> "QuantMode":
        """Accepts a QuantMode, "int8"/"int4"/"none", 8/4/0, or None (= NONE)."""
        if isinstance(value, QuantMode):
            return value
        if value is None:
            return cls.NONE
        if isinstance(value, bool):  # bool is an int: refuse True/False explicitly
            raise ValueError(f"quantization mode must be 'int8', 'int4', 8, 4 or None, got {value!r}")
        if isinstance(value, int):
            for mode in cls:
                if mode.value == value:
                    return mode
        if isinstance(value, str):
            key = value.strip().lower()
            names = {"int8": cls.INT8, "int4": cls.INT4, "none": cls.NONE, "": cls.NONE, "8": cls.INT8, "4": cls.INT4}
            if key in names:
                return names[key]
        raise ValueError(f"quantization mode must be 'int8', 'int4', 8, 4 or None, got {value!r}")


def _qmax(bits: int) -> int:
    if bits not in (8, 4):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    return (1 << (bits - 1)) - 1  # 127 or 7


def quantize_weight(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """THUDM-exact: weight [out, in] -> (int8 [out, in*bits/8], fp16 scale [out]).

    Everything happens in fp16 as in the reference: scale = absmax / (2^(bits-1) - 1), then
    q = round(w / scale) with torch.round (half to even), no clamp.
    """
    qmax = _qmax(bits)
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    if bits == 4 and weight.shape[1] % 2:
        raise ValueError(f"int4 packs two columns a byte: in_features must be even, got {weight.shape[1]}")
    w = weight.detach().to(torch.float16)
    scale = w.abs().amax(dim=-1) / qmax  # [out] fp16
    # [out, in]; an all-zero row is 0/0: store zeros (scale 0 makes the row 0 either way)
    q = torch.nan_to_num(torch.round(w / scale[:, None]), nan=0.0).to(torch.int8)
    if bits == 4:
        q = pack_int4(q)
    return q, scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], [out, in] -> int8 [out, in/2]: column 2j high nibble, 2j+1 low."""
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even number of columns, got {q.shape[-1]}")
    hi, lo = q[..., 0::2].to(torch.int16), q[..., 1::2].to(torch.int16)
    return (((hi & 0xF) << 4) | (lo & 0xF)).to(torch.uint8).view(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: int8 [out, in/2] -> int8 [out, in] with 4-bit sign extension."""
    p = packed.view(torch.int8)
    hi = p >> 4  # arithmetic shift sign-extends the high nibble
    lo = (p << 4) >> 4  # int8 shift left wraps, then sign-extends the low nibble
    return torch.stack((hi, lo), dim=-1).flatten(-2)


def int_weight(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """The stored weight as one int8 value per column: [out, in]."""
    _qmax(bits)
    return unpack_int4(qweight) if bits == 4 else qweight


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """fp16 [out, in] = fp16(q) * fp16 scale, one fp16 multiply and rounding (the reference)."""
    q = int_weight(qweight, bits)
    return q.to(torch.float16) * scale.to(torch.float16)[:, None]
