"""ChatGLM2 configuration, read from and written to THUDM's `config.json`."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json that is missing, unreadable, or not a ChatGLM2 config."""


@dataclass
class ChatGLMConfig:
    # Field names and defaults follow THUDM's ChatGLMConfig (chatglm2-reference.md §1).
    num_layers: int = 28
    padded_vocab_size: int = 65024
    hidden_size: int = 4096
    ffn_hidden_size: int = 13696
    kv_channels: int = 128
    num_attention_heads: int = 32
    seq_length: int = 2048
    hidden_dropout: float = 0.0
    classifier_dropout: float | None = None
    attention_dropout: float = 0.0
    layernorm_epsilon: float = 1e-5
    rmsnorm: bool = True
    apply_residual_connection_post_layernorm: bool = False
    post_layer_norm: bool = True
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    bias_dropout_fusion: bool = True
    multi_query_attention: bool = False
    multi_query_group_num: int = 1
    apply_query_key_layer_scaling: bool = True
    attention_softmax_in_fp32: bool = True
    fp32_residual_connection: bool = False
    quantization_bit: int = 0
    pre_seq_len: int | None = None
    prefix_projection: bool = False
    torch_dtype: str | None = None
    eos_token_id: int = 2
    pad_token_id: int = 0
    model_type: str = "chatglm"
    # Keys we do not model (auto_map, architectures, ...) are kept so a saved config round-trips.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def num_kv_groups(self) -> int:
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads

    @property
    def qkv_bias(self) -> bool:
        return self.add_qkv_bias or self.add_bias_linear

    @property
    def kv_size(self) -> int:
        """Width of one P-Tuning v2 prefix row: layers x (k, v) x groups x head dim."""
        return self.num_layers * 2 * self.num_kv_groups * self.kv_channels

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ChatGLMConfig":
        known = {f.name for f in fields(cls)} - {"extra"}
        model_type = d.get("model_type", "chatglm")
        if model_type != "chatglm":
            raise ConfigError(f"not a ChatGLM2 config: model_type is {model_type!r}, expected 'chatglm'")
        missing = [k for k in ("num_layers", "hidden_size", "kv_channels", "num_attention_heads") if k not in d]
        if missing:
            raise ConfigError(f"not a ChatGLM2 config: missing {', '.join(missing)}")
        cfg = cls(**{k: v for k, v in d.items() if k in known},
                  extra={k: v for k, v in d.items() if k not in known})
        cfg.quantization_bit = int(cfg.quantization_bit or 0)
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> "ChatGLMConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json at {path}")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        return {**extra, **d}

    def save(self, folder: str | Path) -> None:
        Path(folder, "config.json").write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
