"""AdapterRegistry: names -> integer ids -> loaded prefix K/V versions.

Adapters come from a checkpoints folder (`name/` or `name/checkpoint-N`) and from explicit
name=path pairs. Loading validates against the base and folds the prefix once; a refused adapter
is listed as FAILED with its reason and never affects the others. A rewritten checkpoint is
loaded as a new version and swapped in atomically: sequences keep the version they started
with. At most `max_resident` versions stay loaded (least recently used is dropped).
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from chatglm.checkpoint import CheckpointError
from chatglm.config import ChatGLMConfig

from .adapter_files import (AdapterVersion, Manifest, discover, is_adapter_dir, load_version, read_config, read_manifest,
                            stamp, trained_quantization_bit)
from .client import LoadState, ModelInfo, ModelKind
from .errors import AdapterUnavailable, ModelNotFound

_QUANT_NAMES = {0: "unquantized (fp16/bf16)", 8: "int8", 4: "int4"}
log = logging.getLogger("server")  # startup and runtime refusals alike: one line each, from here


@dataclass(eq=False)
class AdapterEntry:
    name: str
    path: Path
    adapter_id: int
    explicit: bool  # named by the operator rather than found by a scan
    state: LoadState = LoadState.AVAILABLE
    error: str | None = None
    current: AdapterVersion | None = None
    last_used: float = 0.0
    failed_stamp: tuple | None = None  # files that were refused; not retried until they change
    warnings: list[str] = field(default_factory=list)
    warnings_for: str = ""  # the version `warnings` were computed for
    load_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class AdapterRegistry:
    def __init__(self, config: ChatGLMConfig, *, base_model_id: str, dtype: torch.dtype, device: str,
                 max_prefix_len: int, max_resident: int = 64, quantization_bit: int = 0,
                 checkpoints_dir: str | Path | None = None, adapters: dict[str, str] | None = None,
                 watch: bool = True, base_path: str | Path | None = None):
        self.config = config
        self.base_model_id = base_model_id
        self.dtype, self.device = dtype, device
        self.max_prefix_len = max_prefix_len
        self.max_resident = max_resident
        self.quantization_bit = quantization_bit
        self.checkpoints_dir = Path(checkpoints_dir) if checkpoints_dir else None
        self.watch = watch
        self._base_path = Path(base_path).resolve() if base_path else None
        self._lock = threading.Lock()
        self._entries: dict[str, AdapterEntry] = {}
        self._next_id = 1  # 0 is never an adapter id: the base model has none
        for name, path in (adapters or {}).items():
            self.add(name, path)
        self.scan()

    # ---- discovery -----------------------------------------------------------------------
    def scan(self) -> None:
        """Pick up adapters that appeared in the checkpoints folder (and newer latest checkpoints)."""
        if self.checkpoints_dir is None:
            return
        for name, path in discover(self.checkpoints_dir, skip=self._base_path).items():
            with self._lock:
                e = self._entries.get(name)
                if e is None:
                    self._entries[name] = AdapterEntry(name, path, self._new_id(), explicit=False)
                elif not e.explicit and e.path != path:
                    e.path = path  # `name` follows its latest checkpoint-N; the stamp check reloads it

    def add(self, name: str, path: str | Path) -> AdapterEntry:
        if not name or name == self.base_model_id:
            raise ValueError(f"invalid adapter name {name!r}")
        with self._lock:
            e = self._entries.get(name)
            if e is None:
                e = self._entries[name] = AdapterEntry(name, Path(path), self._new_id(), explicit=True)
            elif e.path != Path(path):
                e.path, e.explicit = Path(path), True
            return e

    def _new_id(self) -> int:
        i = self._next_id
        self._next_id += 1
        return i

    def names(self) -> list[str]:
        with self._lock:  # a scan on another thread may be adding entries
            return list(self._entries)

    def entry(self, name: str) -> AdapterEntry:
        e = self._entries.get(name)
        if e is None:
            self.scan()
            e = self._entries.get(name)
        if e is None:
            raise ModelNotFound(f"The model `{name}` does not exist.", param="model")
        return e

    def resolve(self, name: str) -> ModelInfo:
        """The adapter's listing; AdapterUnavailable if it was refused and its files have not changed since."""
        info = self.info(name)
        e = self._entries[name]
        if info.state is LoadState.FAILED and e.failed_stamp == stamp(e.path):
            raise AdapterUnavailable(f"adapter `{name}` cannot be served: {info.error}", param="model")
        return info

    # ---- loading ---------------------------------------------------------------------------
    def peek(self, name: str) -> AdapterVersion | None:
        """The current version if it is loaded and its files are unchanged; cheap (a few stat calls)."""
        e = self.entry(name)
        v = e.current
        if v is None:
            return None
        if self.watch:
            now = stamp(e.path)
            if now != v.stamp and now != e.failed_stamp:
                return None
        e.last_used = time.monotonic()
        return v

    def acquire(self, name: str) -> AdapterVersion:
        """The version new requests should use: loads or reloads as needed (blocking: call off the event loop)."""
        v = self.peek(name)
        if v is not None:
            return v
        e = self.entry(name)
        with e.load_lock:
            now = stamp(e.path)
            v = e.current
            if v is not None and (not self.watch or now in (v.stamp, e.failed_stamp)):
                pass
            elif v is None and e.state is LoadState.FAILED and now == e.failed_stamp:
                raise AdapterUnavailable(f"adapter `{e.name}` cannot be served: {e.error}", param="model")
            else:
                v = self._load(e)
        e.last_used = time.monotonic()
        return v

    def _load(self, e: AdapterEntry) -> AdapterVersion:
        e.failed_stamp = None
        attempted = stamp(e.path)
        try:
            if not e.path.is_dir() or not is_adapter_dir(e.path):
                raise CheckpointError(f"{e.path} is not a P-Tuning v2 checkpoint folder (weights plus config.json "
                                      f"with pre_seq_len, or {Path('ptuning_manifest.json')})")
            v = load_version(e.path, self.config, e.adapter_id, e.name, dtype=self.dtype, device=self.device,
                             max_prefix_len=self.max_prefix_len)
        except CheckpointError as err:
            e.failed_stamp = attempted
            if e.current is not None:  # a bad rewrite: keep serving the version that works
                e.error = f"reload failed, still serving version {e.current.version}: {err}"
                log.warning("adapter %s: %s", e.name, e.error)  # once per refused set of files
                return e.current
            e.state, e.error = LoadState.FAILED, str(err)
            log.warning("adapter %s refused: %s", e.name, err)
            raise AdapterUnavailable(f"adapter `{e.name}` cannot be served: {err}", param="model") from err
        with self._lock:
            e.current, e.state, e.error = v, LoadState.LOADED, None  # the atomic swap
            e.last_used = time.monotonic()
        log.info("adapter %s loaded version %s from %s", e.name, v.version, e.path)
        self._evict()
        return v

    def load_all(self) -> None:
        """Eager loading: every known adapter; failures are recorded, not raised."""
        for name in self.names():
            try:
                self.acquire(name)
            except AdapterUnavailable:
                pass

    def reload(self, name: str) -> AdapterVersion:
        e = self.entry(name)
        with e.load_lock:
            return self._load(e)

    def unload(self, name: str) -> None:
        e = self.entry(name)
        with self._lock:
            e.current, e.state, e.error = None, LoadState.AVAILABLE, None

    def _evict(self) -> None:
        with self._lock:
            resident = sorted((e for e in self._entries.values() if e.current is not None), key=lambda e: e.last_used)
            for e in resident[:max(0, len(resident) - self.max_resident)]:
                e.current, e.state = None, LoadState.AVAILABLE

    def _resident(self) -> list[AdapterVersion]:
        with self._lock:
            return [v for e in self._entries.values() if (v := e.current) is not None]

    @property
    def num_resident(self) -> int:
        return len(self._resident())

    @property
    def resident_bytes(self) -> int:
        return sum(v.prefix.num_bytes for v in self._resident())

    # ---- listing -----------------------------------------------------------------------------
    def fingerprint(self, version: AdapterVersion | None) -> str:
        parts = f"{self.base_model_id}|q{self.quantization_bit}|{version.version if version else ''}"
        return "fp_" + hashlib.sha256(parts.encode()).hexdigest()[:12]

    def info(self, name: str) -> ModelInfo:
        e = self.entry(name)
        v = e.current
        manifest = v.manifest if v is not None else read_manifest(e.path)
        pre_seq_len, projection = (v.pre_seq_len, v.prefix_projection) if v else _read_shape(e.path, manifest)
        return ModelInfo(
            id=e.name, kind=ModelKind.ADAPTER, parent=self.base_model_id, path=str(e.path),
            pre_seq_len=pre_seq_len, prefix_projection=projection, version=v.version if v else "",
            state=e.state, error=e.error, created=v.created if v else _mtime(e.path),
            fingerprint=self.fingerprint(v) if v else "",
            manifest=manifest.to_dict() if manifest else {}, warnings=self._warnings_of(e, v, manifest))

    def infos(self) -> list[ModelInfo]:
        self.scan()
        return [self.info(n) for n in self.names()]

    def _warnings_of(self, e: AdapterEntry, v: AdapterVersion | None, manifest: Manifest | None) -> list[str]:
        if v is None:
            return self._warnings(e.path, manifest)
        if e.warnings_for != v.version:  # computed once per loaded version, not per request
            e.warnings, e.warnings_for = self._warnings(e.path, manifest), v.version
        return list(e.warnings)

    def _warnings(self, path: Path, manifest: Manifest | None) -> list[str]:
        out = []
        trained = trained_quantization_bit(path, manifest)
        if trained != self.quantization_bit:
            out.append(f"trained on a {_QUANT_NAMES.get(trained, f'{trained}-bit')} base, served on a "
                       f"{_QUANT_NAMES.get(self.quantization_bit, f'{self.quantization_bit}-bit')} base: "
                       f"outputs may drift from what training measured")
        base = manifest.base_model if manifest else None
        if base and Path(base).name != Path(self.base_model_id).name:
            out.append(f"trained on base `{base}`, served on `{self.base_model_id}`")
        return out


def _read_shape(path: Path, manifest: Manifest | None) -> tuple[int, bool]:
    cfg = read_config(path)
    pre = cfg.get("pre_seq_len") or (manifest.pre_seq_len if manifest else None) or 0
    proj = cfg.get("prefix_projection", manifest.prefix_projection if manifest else False)
    return int(pre), bool(proj)


def _mtime(path: Path) -> int:
    try:
        return int(path.stat().st_mtime)
    except OSError:
        return 0
