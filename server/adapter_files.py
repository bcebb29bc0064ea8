"""P-Tuning v2 adapters on disk: discovery in a checkpoints folder, the training manifest, and
loading one version (validated against the base, folded to per-layer K/V, content-hashed)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes

from chatglm.checkpoint import PREFIX_KEY, CheckpointError, check_prefix_fits
from chatglm.config import ChatGLMConfig
from chatglm.prefix import PrefixEncoder, PrefixKV

MANIFEST_FILE = "ptuning_manifest.json"
WEIGHT_FILES = ("pytorch_model.bin", "model.safetensors")
_CHECKPOINT_DIR = re.compile(r"checkpoint-(\d+)")


@dataclass(frozen=True)
class Manifest:
    """What the trainer records next to a checkpoint (`ptuning_manifest.json`)."""

    base_model: str | None = None
    quantization_bit: int | None = None  # of the frozen base during training; 0/None = not quantized
    source_prefix: str = ""
    max_source_length: int | None = None
    max_target_length: int | None = None
    pre_seq_len: int | None = None
    prefix_projection: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, folder: Path) -> "Manifest | None":
        path = folder / MANIFEST_FILE
        if not path.is_file():
            return None
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path} is not readable JSON: {e}") from e
        if not isinstance(d, dict):
            raise CheckpointError(f"{path} must hold a JSON object")
        known = {f.name for f in fields(cls)} - {"extra"}
        m = cls(**{k: v for k, v in d.items() if k in known}, extra={k: v for k, v in d.items() if k not in known})
        if m.source_prefix is None or not isinstance(m.source_prefix, str):
            raise CheckpointError(f"{path}: source_prefix must be a string")
        return m

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**self.extra, **d}


def read_config(folder: Path) -> dict:
    """The folder's config.json as a dict; {} when it is missing or not a JSON object."""
    try:
        d = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def read_manifest(folder: Path) -> Manifest | None:
    """The manifest, or None when there is none or it is unreadable (loading reports why)."""
    try:
        return Manifest.read(folder)
    except CheckpointError:
        return None


def trained_quantization_bit(folder: Path, manifest: Manifest | None = None) -> int:
    """The quantization of the base the adapter was trained on: its manifest, else THUDM's config.json
    (`quantization_bit`, which THUDM's `quantize()` records); 0 = not quantized."""
    manifest = manifest if manifest is not None else read_manifest(folder)
    if manifest is not None and manifest.quantization_bit is not None:
        return int(manifest.quantization_bit or 0)
    return int(read_config(folder).get("quantization_bit") or 0)


def is_adapter_dir(folder: Path) -> bool:
    """Weights plus a manifest, or a config.json that names a pre_seq_len (a base model folder has none)."""
    if not any((folder / n).is_file() for n in WEIGHT_FILES):
        return False
    if (folder / MANIFEST_FILE).is_file():
        return True
    cfg = folder / "config.json"
    if not cfg.is_file():
        return True  # weights alone: a candidate; loading says why it is refused if it is not an adapter
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get("pre_seq_len") is not None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return True


def discover(root: Path, skip: Path | None = None) -> dict[str, Path]:
    """Adapter ids in a checkpoints folder: `name` and `name/checkpoint-N`; `name` alone means
    the folder itself, or else its latest checkpoint."""
    found: dict[str, Path] = {}
    if not root.is_dir():
        return found
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):  # .staging: unfinished
        if skip is not None and d.resolve() == skip:
            continue
        if is_adapter_dir(d):
            found[d.name] = d
        ckpts = [c for c in d.iterdir() if c.is_dir() and _CHECKPOINT_DIR.fullmatch(c.name) and is_adapter_dir(c)]
        ckpts.sort(key=lambda c: int(_CHECKPOINT_DIR.fullmatch(c.name).group(1)))
        for c in ckpts:
            found[f"{d.name}/{c.name}"] = c
        if ckpts and d.name not in found:
            found[d.name] = ckpts[-1]
    return found


def weights_file(folder: Path) -> Path:
    for n in WEIGHT_FILES:
        if (folder / n).is_file():
            return folder / n
    raise CheckpointError(f"no {' or '.join(WEIGHT_FILES)} in {folder}")


def stamp(folder: Path) -> tuple:
    """Cheap change detector: (name, mtime, size) of the files a version is made of."""
    out = []
    for n in (*WEIGHT_FILES, "config.json", MANIFEST_FILE):
        try:
            st = os.stat(folder / n)
        except OSError:
            continue
        out.append((n, st.st_mtime_ns, st.st_size))
    return tuple(out)


@dataclass(eq=False)
class AdapterVersion:
    """One loaded version of an adapter; immutable, shared by every sequence that uses it."""

    adapter_id: int
    name: str
    version: str  # content hash (blake2b) of weights, config.json and manifest
    prefix: PrefixKV  # [L, 2, P, G, D] in the serving dtype and device
    prefix_projection: bool
    manifest: Manifest | None
    stamp: tuple
    load_seconds: float
    created: int  # weights file mtime, unix seconds

    @property
    def pre_seq_len(self) -> int:
        return self.prefix.pre_seq_len

    @property
    def cache_key(self) -> tuple:
        return (self.adapter_id, self.version)


def _read_state(path: Path, data: bytes) -> dict[str, torch.Tensor]:
    try:
        sd = (load_safetensors_bytes(data) if path.suffix == ".safetensors"
              else torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
    except Exception as e:  # noqa: BLE001 - a damaged file raises many exception types
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from e
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    state = {k[len(PREFIX_KEY):]: v for k, v in sd.items() if isinstance(k, str) and k.startswith(PREFIX_KEY)}
    if not state:
        raise CheckpointError(f"{path} holds no {PREFIX_KEY}* tensors; is it a P-Tuning v2 checkpoint?")
    return state


def _fold(folder: Path, state: dict[str, torch.Tensor], config: ChatGLMConfig, pre_seq_len: int,
          projection: bool) -> torch.Tensor:
    """The prefix as K/V rows: the embedding, through the projection MLP once when there is one."""
    if not projection:
        if set(state) != {"embedding.weight"}:
            raise CheckpointError(f"{folder}: unexpected prefix_encoder tensors {sorted(set(state) - {'embedding.weight'})}")
        return state["embedding.weight"].float()
    with torch.device("meta"):  # no random init of weights that are about to be replaced
        encoder = PrefixEncoder(config, pre_seq_len, projection)
    try:
        encoder.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{folder}: prefix encoder does not load: {e}") from e
    return encoder()


def load_version(folder: Path, config: ChatGLMConfig, adapter_id: int, name: str, *, dtype: torch.dtype,
                 device: torch.device | str, max_prefix_len: int) -> AdapterVersion:
    """Read, validate and fold one adapter folder; raises CheckpointError with the reason."""
    t0 = time.perf_counter()
    if not folder.is_dir():
        raise CheckpointError(f"adapter folder {folder} does not exist")
    before = stamp(folder)
    path = weights_file(folder)
    data = path.read_bytes()  # hash exactly the bytes that are loaded
    digest = hashlib.blake2b(data, digest_size=16)  # content hash; blake2b is ~2x faster than sha256 here
    for extra in ("config.json", MANIFEST_FILE):
        if (folder / extra).is_file():
            digest.update((folder / extra).read_bytes())
    manifest = Manifest.read(folder)
    state = _read_state(path, data)
    pre_seq_len, projection = check_prefix_fits(folder, state, config)
    if manifest is not None:
        if manifest.pre_seq_len is not None and manifest.pre_seq_len != pre_seq_len:
            raise CheckpointError(f"{folder}: manifest says pre_seq_len {manifest.pre_seq_len}, weights have {pre_seq_len}")
        if manifest.prefix_projection is not None and bool(manifest.prefix_projection) != projection:
            raise CheckpointError(f"{folder}: manifest says prefix_projection {manifest.prefix_projection}, "
                                  f"weights say {projection}")
    if pre_seq_len > max_prefix_len:
        raise CheckpointError(f"{folder}: pre_seq_len {pre_seq_len} exceeds the engine's max_prefix_len "
                              f"{max_prefix_len}; start the server with a larger max_prefix_len")
    with torch.inference_mode():
        flat = _fold(folder, state, config, pre_seq_len, projection)  # [P, kv_size] fp32
        kv = PrefixKV.from_flat(flat, config).kv  # [L, 2, P, G, D]
        if not torch.isfinite(kv).all():
            raise CheckpointError(f"{folder}: the prefix holds NaN or infinite values")
        prefix = PrefixKV(kv.to(dtype=dtype, device=device).contiguous())
    if stamp(folder) != before:
        raise CheckpointError(f"{folder} changed while it was being read; try again")
    return AdapterVersion(adapter_id, name, digest.hexdigest()[:12], prefix, projection, manifest, before,
                          time.perf_counter() - t0, int(path.stat().st_mtime))
