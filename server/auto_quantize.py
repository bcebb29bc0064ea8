"""`--quantize auto` (the default): serve the base the way its adapters were trained on it.

A P-Tuning v2 prefix is trained against one frozen base; THUDM's scripts train on a quantized base
(`--quantization_bit 4`) and quantize it the same way again for inference. So, unless the operator
says otherwise: a folder stored quantized (config `quantization_bit`, as chatglm2-6b-int4) loads as
stored; otherwise the base is quantized as the adapters found at startup were trained (their
manifest's or config's `quantization_bit`) when they all agree, and left unquantized when they do
not or when there are none. Adapters whose config names another architecture do not count.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .adapter_files import discover, read_config, trained_quantization_bit

_MODES = {0: None, 8: "int8", 4: "int4"}
ARCHITECTURE = ("num_layers", "hidden_size", "kv_channels", "multi_query_group_num")  # what a prefix's shape needs


@dataclass(frozen=True)
class QuantizeChoice:
    quantize: str | None  # what load_model gets: None = as stored
    reason: str


def _config_bits(folder: Path) -> int:
    return int(read_config(folder).get("quantization_bit") or 0)


def made_for(adapter: Path, base_config: dict) -> bool:
    """False when the adapter's config.json names another architecture (its prefix cannot fit this base)."""
    own = read_config(adapter)
    return all(own.get(k) == base_config.get(k) for k in ARCHITECTURE if k in own and k in base_config)


def quantization_shown(quantize: str | None, model_path: Path) -> str:
    """For the startup log: int8/int4 at load, `int4 as stored`, or none."""
    bits = _config_bits(Path(model_path))
    return quantize or (f"int{bits} as stored" if bits else "none")


def choose_quantize(model_path: Path, checkpoints: Path, adapters: dict[str, Path]) -> QuantizeChoice:
    base_config = read_config(Path(model_path))
    stored = int(base_config.get("quantization_bit") or 0)
    if stored:
        return QuantizeChoice(None, f"the base folder is stored int{stored}")
    found = {name: Path(path) for name, path in {**discover(checkpoints, skip=Path(model_path).resolve()),
                                                  **adapters}.items() if made_for(Path(path), base_config)}
    if not found:
        return QuantizeChoice(None, "no adapters of this base's shape to match")
    by_bits: dict[int, list[str]] = {}
    for name, path in found.items():
        by_bits.setdefault(trained_quantization_bit(path), []).append(name)
    if len(by_bits) > 1:
        detail = "; ".join(f"{_MODES.get(b) or 'unquantized'}: {', '.join(sorted(n))}" for b, n in sorted(by_bits.items()))
        return QuantizeChoice(None, f"the adapters were trained on differently quantized bases ({detail}); "
                                    "pass --quantize to choose")
    (bits, names), = by_bits.items()
    if bits not in _MODES:
        return QuantizeChoice(None, f"the adapters name quantization_bit {bits}, which this server cannot serve")
    mode = _MODES[bits]
    return QuantizeChoice(mode, f"{', '.join(sorted(names))} trained on an {mode or 'unquantized'} base")
