"""ServerSettings: every knob of `python -m server`, parsed from argv with CHATGLM_* environment fallbacks."""
from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from .engine_config import AdapterLoading

ENV_PREFIX = "CHATGLM_"
REPO_ROOT = Path(__file__).resolve().parents[1]
# The checkout's checkpoints/; after a non-editable `pip install .` the package sits in site-packages,
# so the ./checkpoints of the directory the server starts in is the bundled one.
DEFAULT_CHECKPOINTS = next((d for d in (REPO_ROOT / "checkpoints", Path.cwd() / "checkpoints") if d.is_dir()),
                           REPO_ROOT / "checkpoints")
DEMO_MODEL = DEFAULT_CHECKPOINTS / "demo-base"
ENGINE_LIMITS = ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "max_waiting", "kv_budget_tokens",
                 "max_prefix_len", "max_resident_adapters", "adapter_loading", "huge_pages")


class Choice(str, Enum):
    """A command-line choice: shown and compared as its value (`--help` lists `none`, not `Quantize.NONE`)."""

    def __str__(self) -> str:
        return self.value


class Quantize(Choice):
    AUTO = "auto"  # as stored, else as the served adapters were trained (server/auto_quantize.py)
    NONE = "none"
    INT8 = "int8"
    INT4 = "int4"


class DType(Choice):
    AUTO = "auto"  # float32 on CPU, bfloat16 on GPU (the engine decides)
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class LogLevel(Choice):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


@dataclass
class ServerSettings:
    model: Path | None = None  # None: the bundled demo model at checkpoints/demo-base
    model_name: str | None = None  # the base model's id in the API (default: its folder name)
    quantize: Quantize = Quantize.AUTO
    dtype: DType = DType.AUTO
    device: str = "auto"
    checkpoints: Path = DEFAULT_CHECKPOINTS
    adapters: dict[str, Path] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)
    metrics_auth: bool = False
    max_body_bytes: int = 4 * 1024 * 1024
    drain_timeout: float = 30.0
    max_metric_models: int = 32
    torch_threads: int | None = None
    log_level: LogLevel = LogLevel.INFO
    static_dir: Path = Path(__file__).resolve().parent / "static"
    # Engine limits, passed through to EngineConfig (None: the engine's default).
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    max_waiting: int | None = None
    kv_budget_tokens: int | None = None
    max_prefix_len: int | None = None
    max_resident_adapters: int | None = None
    adapter_loading: AdapterLoading | None = None
    huge_pages: bool | None = None

    @property
    def model_path(self) -> Path:
        return self.model if self.model is not None else DEMO_MODEL

    @property
    def base_model_id(self) -> str:
        return self.model_name or self.model_path.resolve().name

    def engine_limits(self) -> dict[str, object]:
        """EngineConfig keyword arguments the operator set (the rest keep the engine's defaults)."""
        return {n: getattr(self, n) for n in ENGINE_LIMITS if getattr(self, n) is not None}


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _adapter(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, Path(path)


def _flag(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m server",
        description="OpenAI-compatible server for ChatGLM2 and its P-Tuning v2 prefix adapters. Every option "
                    f"can also be set with an environment variable {ENV_PREFIX}<OPTION> (e.g. {ENV_PREFIX}PORT=9000, "
                    f"{ENV_PREFIX}API_KEY=k1,k2); the command line wins.")
    add = p.add_argument
    add("--model", type=Path, help="ChatGLM2 model folder as published (config.json, weights, tokenizer.model). "
                                   f"Default: the bundled demo model at {DEMO_MODEL}")
    add("--model-name", help="the id the base model is served as (default: the model folder's name)")
    add("--quantize", type=Quantize, choices=list(Quantize),
        help="quantize the base at load: int8, int4 or none. Default auto: a folder stored quantized loads as "
             "stored, else the base is quantized as the adapters at startup were trained (their quantization_bit)")
    add("--dtype", type=DType, choices=list(DType), help="weights/activations dtype (default auto)")
    add("--device", help="cpu, cuda, cuda:N or auto (default auto: cuda when available)")
    add("--checkpoints", type=Path, help=f"adapter folder: each sub-folder (or name/checkpoint-N) is a model id; "
                                         f"admin loads are confined to it (default {DEFAULT_CHECKPOINTS})")
    add("--adapter", type=_adapter, action="append", metavar="NAME=PATH",
        help="serve the P-Tuning v2 checkpoint at PATH as model NAME (repeatable)")
    add("--host", help="listen address (default 127.0.0.1; 0.0.0.0 for all interfaces)")
    add("--port", type=int, help="listen port (default 8000)")
    add("--api-key", action="append", metavar="KEY",
        help="require 'Authorization: Bearer KEY' on /v1/* (repeatable; none = no auth, admin routes disabled)")
    add("--api-key-file", type=Path, help="file with one API key per line ('#' starts a comment)")
    add("--metrics-auth", type=_flag, nargs="?", const=True, help="require an API key on /metrics too")
    add("--max-body-bytes", type=_positive_int, help="largest request body accepted, else 413 (default 4 MiB)")
    add("--drain-timeout", type=float, help="seconds in-flight requests may finish after SIGTERM (default 30)")
    add("--max-metric-models", type=_positive_int,
        help="per-adapter metric series before the rest share model=\"other\" (default 32)")
    add("--torch-threads", type=_positive_int, help="torch intra-op threads (default: torch's choice)")
    add("--log-level", type=LogLevel, choices=list(LogLevel), help="logging level (default info)")
    add("--max-model-len", type=_positive_int, help="engine: longest prompt + completion in tokens")
    add("--max-num-seqs", type=_positive_int, help="engine: most sequences decoded together")
    add("--max-num-batched-tokens", type=_positive_int, help="engine: most tokens in one forward step")
    add("--max-waiting", type=_positive_int, help="engine: queued requests before new ones get 429")
    add("--kv-budget-tokens", type=_positive_int, help="engine: KV cache budget in tokens (all sequences)")
    add("--max-prefix-len", type=_positive_int, help="engine: largest adapter pre_seq_len served")
    add("--max-resident-adapters", type=_positive_int, help="engine: adapters kept loaded (LRU beyond)")
    add("--adapter-loading", type=AdapterLoading, choices=list(AdapterLoading),
        help="engine: load adapters found in --checkpoints at startup (eager) or on first use (lazy)")
    add("--huge-pages", type=_flag, nargs="?", const=True, metavar="BOOL",
        help="engine, CPU: keep the weights on transparent huge pages (default true; decode reads them ~10-25%% "
             "faster, loading takes longer on some VMs)")
    return p


_REPEATED = {"adapter", "api_key"}  # env value is a comma-separated list


def parse_settings(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> ServerSettings:
    env = os.environ if env is None else env
    parser = build_parser()
    args = parser.parse_args(argv)
    for action in parser._actions:
        dest = action.dest
        if dest == "help" or getattr(args, dest) is not None:
            continue
        raw = env.get(ENV_PREFIX + dest.upper())
        if raw is None:
            continue
        convert = action.type or str
        try:
            value = [convert(v.strip()) for v in raw.split(",") if v.strip()] if dest in _REPEATED else convert(raw)
        except (ValueError, argparse.ArgumentTypeError) as e:
            parser.error(f"{ENV_PREFIX}{dest.upper()}: {e}")
        setattr(args, dest, value)
    settings = ServerSettings()
    for name, value in vars(args).items():
        if value is None or name in ("adapter", "api_key", "api_key_file"):
            continue
        setattr(settings, name, value)
    settings.adapters = dict(args.adapter or [])
    settings.api_keys = list(args.api_key or [])
    if args.api_key_file is not None:
        try:
            lines = Path(args.api_key_file).read_text(encoding="utf-8").splitlines()
        except OSError as e:
            parser.error(f"--api-key-file: {e}")
        settings.api_keys += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if any(not k for k in settings.api_keys):
        parser.error("API keys must not be empty")
    return settings
