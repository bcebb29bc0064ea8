"""`ptuning_manifest.json`: what a server needs to serve a checkpoint as it was trained.

Written last into each checkpoint-N (after every other file), so its presence also marks the folder
complete. Keys: base_model, base_config_hash (sha256 of the base config.json bytes),
quantization_bit (0/4/8), source_prefix, max_source_length, max_target_length, pre_seq_len
(null for a full fine-tune), prefix_projection, prompt_column, response_column, history_column.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

MANIFEST_NAME = "ptuning_manifest.json"


def config_hash(model_folder: str | Path) -> str:
    return hashlib.sha256(Path(model_folder, "config.json").read_bytes()).hexdigest()


@dataclass(frozen=True)
class PTuningManifest:
    base_model: str
    base_config_hash: str
    quantization_bit: int
    source_prefix: str
    max_source_length: int
    max_target_length: int
    pre_seq_len: int | None
    prefix_projection: bool
    prompt_column: str | None
    response_column: str | None
    history_column: str | None

    def write(self, folder: str | Path) -> None:
        path = Path(folder, MANIFEST_NAME)
        with path.open("w", encoding="utf-8") as f:
            f.write(json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    @classmethod
    def read(cls, folder: str | Path) -> "PTuningManifest":
        d = json.loads(Path(folder, MANIFEST_NAME).read_text(encoding="utf-8"))
        missing = [f.name for f in fields(cls) if f.name not in d]
        if missing:
            raise ValueError(f"{Path(folder, MANIFEST_NAME)} lacks {', '.join(missing)}")
        return cls(**{f.name: d[f.name] for f in fields(cls)})
