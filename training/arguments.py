"""Command-line arguments: THUDM's ModelArguments / DataTrainingArguments (ptuning/arguments.py) plus
transformers' Seq2SeqTrainingArguments, extended with the 4.30-era flags that newer transformers
dropped, so THUDM's train.sh / evaluate.sh lines parse unchanged."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, Seq2SeqTrainingArguments

from chatglm.quant_format import QuantMode

DATA_SUFFIXES = (".json", ".jsonl")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Local folder of a ChatGLM2 model (config.json, weights, tokenizer.model)."})
    ptuning_checkpoint: str | None = field(default=None, metadata={"help": "P-Tuning v2 checkpoint folder to start from (its prefix encoder is loaded)."})
    config_name: str | None = field(default=None, metadata={"help": "Accepted for compatibility; unused (as in THUDM)."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Accepted for compatibility; unused (as in THUDM)."})
    cache_dir: str | None = field(default=None, metadata={"help": "Accepted for compatibility; unused."})
    use_fast_tokenizer: bool = field(default=True, metadata={"help": "Accepted for compatibility; unused (as in THUDM)."})
    model_revision: str = field(default="main", metadata={"help": "Accepted for compatibility; unused (as in THUDM)."})
    use_auth_token: bool = field(default=False, metadata={"help": "Accepted for compatibility; unused (no network)."})
    resize_position_embeddings: bool | None = field(default=None, metadata={"help": "Accepted for compatibility; unused (as in THUDM)."})
    quantization_bit: int | None = field(default=None, metadata={"choices": [4, 8], "help": "Quantize the frozen base to int8 or int4 weights."})
    pre_seq_len: int | None = field(default=None, metadata={"help": "P-Tuning v2 prefix length; without it all parameters train (full fine-tuning)."})
    prefix_projection: bool = field(default=False, metadata={"help": "Add THUDM's Linear-Tanh-Linear projection to the prefix encoder."})

    @property
    def quantization(self) -> QuantMode:
        return QuantMode.parse(self.quantization_bit)

    def __post_init__(self) -> None:
        if self.pre_seq_len is not None and self.pre_seq_len < 1:
            raise ValueError(f"--pre_seq_len must be positive, got {self.pre_seq_len}")


@dataclass
class DataTrainingArguments:
    lang: str | None = field(default=None, metadata={"help": "Language id (unused, as in THUDM)."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub datasets are not supported (no network); use --train_file etc."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Unused."})
    prompt_column: str | None = field(default=None, metadata={"help": "Column holding the query (e.g. content)."})
    response_column: str | None = field(default=None, metadata={"help": "Column holding the answer (e.g. summary)."})
    history_column: str | None = field(default=None, metadata={"help": "Column holding earlier rounds: [[query, answer], ...]."})
    train_file: str | None = field(default=None, metadata={"help": "JSON-lines training file (.json or .jsonl)."})
    validation_file: str | None = field(default=None, metadata={"help": "JSON-lines file for --do_eval."})
    test_file: str | None = field(default=None, metadata={"help": "JSON-lines file for --do_predict."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Accepted for compatibility; preprocessing is never cached."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Accepted for compatibility; preprocessing runs in-process."})
    max_source_length: int | None = field(default=1024, metadata={"help": "Max prompt tokens, counting [gMASK] sop (truncated on the right)."})
    max_target_length: int | None = field(default=128, metadata={"help": "Max answer tokens for training."})
    val_max_target_length: int | None = field(default=None, metadata={"help": "Max answer tokens for eval/predict (default: --max_target_length)."})
    pad_to_max_length: bool = field(default=False, metadata={"help": "Unused (as in THUDM)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N validation rows."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Use only the first N test rows."})
    num_beams: int | None = field(default=None, metadata={"help": "Beams for eval generation (only 1 is supported)."})
    ignore_pad_token_for_loss: bool = field(default=True, metadata={"help": "Set label -100 wherever the label is the pad id 0."})
    source_prefix: str | None = field(default="", metadata={"help": "Text put before every prompt."})
    forced_bos_token: str | None = field(default=None, metadata={"help": "Unused (as in THUDM)."})

    def __post_init__(self) -> None:
        if self.dataset_name is not None and not any((self.train_file, self.validation_file, self.test_file)):
            raise ValueError("--dataset_name needs the Hugging Face Hub, which is not reachable; pass --train_file etc.")
        if self.dataset_name is None and not any((self.train_file, self.validation_file, self.test_file)):
            raise ValueError("Need either a dataset name or a training/validation/test file.")
        for flag in ("train_file", "validation_file", "test_file"):
            path = getattr(self, flag)
            if path is not None and Path(path).suffix not in DATA_SUFFIXES:
                raise ValueError(f"--{flag} {path}: expected a JSON-lines file ending in .json or .jsonl")
        if self.val_max_target_length is None:
            self.val_max_target_length = self.max_target_length


@dataclass
class PTuningTrainingArguments(Seq2SeqTrainingArguments):
    """Seq2SeqTrainingArguments plus flags transformers 4.30 had (THUDM pins 4.30.2)."""

    overwrite_output_dir: bool = field(default=False, metadata={"help": "Allow training into an output_dir that already holds checkpoint-N folders (same-numbered ones are replaced)."})
    evaluation_strategy: str | None = field(default=None, metadata={"help": "Old name of --eval_strategy."})
    logging_dir: str | None = field(default=None, metadata={"help": "TensorBoard log folder (default: output_dir/runs/...)."})
    no_cuda: bool = field(default=False, metadata={"help": "Old name of --use_cpu."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Warmup as a fraction of total steps (becomes --warmup_steps)."})
    save_safetensors: bool = field(default=True, metadata={"help": "Full fine-tuning: save model.safetensors (else pytorch_model.bin). Prefix checkpoints are always pytorch_model.bin, as THUDM's."})
    per_gpu_train_batch_size: int | None = field(default=None, metadata={"help": "Old name of --per_device_train_batch_size."})
    per_gpu_eval_batch_size: int | None = field(default=None, metadata={"help": "Old name of --per_device_eval_batch_size."})
    group_by_length: bool = field(default=False, metadata={"help": "Old name of --train_sampling_strategy group_by_length."})
    half_precision_backend: str | None = field(default=None, metadata={"help": "Accepted for compatibility; ignored."})
    fp16_backend: str | None = field(default=None, metadata={"help": "Accepted for compatibility; ignored."})
    report_to: None | str | list[str] = field(default=None, metadata={"help": "Loggers to report to (default: tensorboard when installed, as 4.30's 'all')."})

    def __post_init__(self) -> None:
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
        if self.no_cuda:
            self.use_cpu = True
        if self.warmup_ratio and not self.warmup_steps:
            self.warmup_steps = self.warmup_ratio
        if self.per_gpu_train_batch_size:
            self.per_device_train_batch_size = self.per_gpu_train_batch_size
        if self.per_gpu_eval_batch_size:
            self.per_device_eval_batch_size = self.per_gpu_eval_batch_size
        if self.group_by_length:
            self.train_sampling_strategy = "group_by_length"
        if self.ddp_find_unused_parameters is None:
            self.ddp_find_unused_parameters = False  # every trainable parameter is used (THUDM's 4.30 setting)
        if self.report_to is None:
            self.report_to = "tensorboard" if importlib.util.find_spec("tensorboard") else "none"
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # nothing to pin for; avoids torch's warning
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                self.use_cpu = True  # accelerate runs torchrun's CPU processes as DDP (gloo) only with cpu=True
        if self.logging_dir is not None:
            os.environ["TENSORBOARD_LOGGING_DIR"] = self.logging_dir  # where 5.x's TensorBoard callback looks
        super().__post_init__()


ARGUMENT_CLASSES = (ModelArguments, DataTrainingArguments, PTuningTrainingArguments)


def build_parser() -> HfArgumentParser:
    return HfArgumentParser(ARGUMENT_CLASSES, description="P-Tuning v2 / full fine-tuning of ChatGLM2 (THUDM's ptuning/main.py flags).")


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataTrainingArguments, PTuningTrainingArguments]:
    """Parse argv; a single `.json` argument is read as a file of arguments, as THUDM's main.py does."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_dict(json.loads(Path(argv[0]).read_text(encoding="utf-8")))
    return parser.parse_args_into_dataclasses(args=argv)
