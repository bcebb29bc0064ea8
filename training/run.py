"""`python -m training.run`: THUDM's ptuning/main.py flow on our ChatGLM2 (reference §6).

    torchrun --standalone --nnodes=1 --nproc-per-node=1 -m training.run --do_train \\
      --train_file AdvertiseGen/train.json --validation_file AdvertiseGen/dev.json \\
      --prompt_column content --response_column summary --overwrite_cache \\
      --model_name_or_path checkpoints/base/demo --output_dir output/adgen-pt-128-2e-2 \\
      --overwrite_output_dir --max_source_length 64 --max_target_length 128 \\
      --per_device_train_batch_size 1 --per_device_eval_batch_size 1 --gradient_accumulation_steps 16 \\
      --predict_with_generate --max_steps 3000 --logging_steps 10 --save_steps 1000 \\
      --learning_rate 2e-2 --pre_seq_len 128 --quantization_bit 4
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import set_seed

from chatglm.tokenizer import ChatGLMTokenizer

from .arguments import DataTrainingArguments, ModelArguments, PTuningTrainingArguments, parse_args
from .data import Columns, collate, preprocess_eval, preprocess_train, print_dataset_example, read_rows
from .logs import setup_logging
from .manifest import PTuningManifest, config_hash
from .metrics import GenerationMetrics, decode_rows
from .model_setup import build_model
from .plot import LOSS_CURVE_NAME, plot_loss_curve
from .preflight import OutputDirError, check_free_space, check_writable, checkpoint_bytes
from .trainer import STAGING_DIR, PrefixTrainer

logger = logging.getLogger("training.run")


def check_output_dir(args: PTuningTrainingArguments) -> None:
    """4.30's examples meaning of --overwrite_output_dir: refuse to train over earlier checkpoints
    unless asked to (or resuming); stale staging folders of a killed run are removed."""
    out = Path(args.output_dir)
    if not out.is_dir() or not args.should_save:
        return
    shutil.rmtree(out / STAGING_DIR, ignore_errors=True)
    earlier = sorted(p.name for p in out.glob("checkpoint-*") if p.is_dir())
    if args.do_train and earlier and not args.overwrite_output_dir and args.resume_from_checkpoint is None:
        raise ValueError(f"Output directory ({out}) already exists and holds {', '.join(earlier)}. "
                         "Use --overwrite_output_dir to train over it or --resume_from_checkpoint to continue.")


def make_manifest(model_args: ModelArguments, data_args: DataTrainingArguments) -> PTuningManifest:
    return PTuningManifest(
        base_model=model_args.model_name_or_path, base_config_hash=config_hash(model_args.model_name_or_path),
        quantization_bit=model_args.quantization.bits, source_prefix=data_args.source_prefix or "",
        max_source_length=data_args.max_source_length, max_target_length=data_args.max_target_length,
        pre_seq_len=model_args.pre_seq_len, prefix_projection=model_args.prefix_projection,
        prompt_column=data_args.prompt_column, response_column=data_args.response_column,
        history_column=data_args.history_column)


def load_split(path: str | None, flag: str, limit: int | None, columns: Columns, tok: ChatGLMTokenizer,
               data_args: DataTrainingArguments, train: bool) -> list[dict[str, list[int]]]:
    if path is None:
        file_flag = {"train": "--train_file", "eval": "--validation_file", "predict": "--test_file"}[flag]
        raise ValueError(f"--do_{flag} requires {file_flag}")
    rows = read_rows(path, columns, limit)
    if train:
        feats = preprocess_train(rows, tok, data_args.max_source_length, data_args.max_target_length,
                                 data_args.source_prefix or "", data_args.ignore_pad_token_for_loss)
    else:
        feats = preprocess_eval(rows, tok, data_args.max_source_length, data_args.val_max_target_length,
                                data_args.source_prefix or "", data_args.ignore_pad_token_for_loss)
    if not feats:
        raise ValueError(f"{path}: no rows with a non-empty {columns.prompt!r} and {columns.response!r}")
    print_dataset_example(feats[0], tok)
    return feats


def write_predictions(path: Path, predictions, label_ids, tok: ChatGLMTokenizer) -> None:
    preds = [p.strip() for p in decode_rows(predictions, tok)]
    labels = [t.strip() for t in decode_rows(label_ids, tok)]
    with path.open("w", encoding="utf-8") as f:
        for p, t in zip(preds, labels, strict=True):
            f.write(json.dumps({"labels": t, "predict": p}, ensure_ascii=False) + "\n")


@dataclass
class Run:
    """Everything `setup` prepared; `execute` trains/evaluates/predicts with it."""

    model_args: ModelArguments
    data_args: DataTrainingArguments
    training_args: PTuningTrainingArguments
    tokenizer: ChatGLMTokenizer
    trainer: PrefixTrainer
    train_ds: list | None
    eval_ds: list | None
    predict_ds: list | None


def setup(argv: list[str] | None = None) -> Run | None:
    """Parse, log the run's parameters, load tokenizer/model/data (THUDM's order) and build the trainer."""
    model_args, data_args, training_args = parse_args(argv)
    setup_logging(training_args)
    distributed = training_args.world_size > 1  # `local_rank` stays -1 under torchrun in transformers 5
    rank = training_args.local_process_index if distributed else -1
    logger.warning(f"Process rank: {rank}, device: {training_args.device}, "
                   f"n_gpu: {training_args.n_gpu}distributed training: {distributed}, "
                   f"16-bits training: {training_args.fp16}")
    logger.info(f"Training/evaluation parameters {training_args}")
    if not (training_args.do_train or training_args.do_eval or training_args.do_predict):
        logger.info("There is nothing to do. Please pass `do_train`, `do_eval` and/or `do_predict`.")
        return None
    check_output_dir(training_args)
    if training_args.should_save:  # before the model loads: a run that cannot save stops now, not at step N
        check_writable(training_args.output_dir)
    set_seed(training_args.seed)
    tok = ChatGLMTokenizer.from_folder(model_args.model_name_or_path)
    if model_args.quantization_bit is not None:
        print(f"Quantized to {model_args.quantization_bit} bit")
    model = build_model(model_args, training_args.device, bf16=training_args.bf16)
    if training_args.should_save and training_args.do_train:
        check_free_space(training_args.output_dir, checkpoint_bytes(model, model_args.model_name_or_path))
    columns = Columns(data_args.prompt_column or "content", data_args.response_column or "summary",
                      data_args.history_column)
    splits = {"train": (data_args.train_file, data_args.max_train_samples, training_args.do_train),
              "eval": (data_args.validation_file, data_args.max_eval_samples, training_args.do_eval),
              "predict": (data_args.test_file, data_args.max_predict_samples, training_args.do_predict)}
    with training_args.main_process_first(desc="dataset preprocessing"):
        ds = {name: load_split(path, name, limit, columns, tok, data_args, name == "train") if wanted else None
              for name, (path, limit, wanted) in splits.items()}
    # THUDM: eval generation is bounded by val_max_target_length unless given, beams by --num_beams
    training_args.generation_max_length = training_args.generation_max_length or data_args.val_max_target_length
    training_args.generation_num_beams = data_args.num_beams or training_args.generation_num_beams
    trainer = PrefixTrainer(
        model=model, args=training_args, train_dataset=ds["train"], eval_dataset=ds["eval"], data_collator=collate,
        compute_metrics=GenerationMetrics(tok) if training_args.predict_with_generate else None,
        tokenizer=tok, manifest=make_manifest(model_args, data_args), quantization=model_args.quantization)
    return Run(model_args, data_args, training_args, tok, trainer, ds["train"], ds["eval"], ds["predict"])


def execute(run: Run) -> dict[str, float]:
    trainer, args, data_args = run.trainer, run.training_args, run.data_args
    results: dict[str, float] = {}
    if args.do_train:
        train_result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
        metrics = train_result.metrics
        metrics.pop("total_flos", None)  # 4.30's progress callback popped it from this very dict
        metrics["train_samples"] = len(run.train_ds)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        results.update(metrics)
        if trainer.is_world_process_zero():
            plot_loss_curve(trainer.state.log_history, Path(args.output_dir) / LOSS_CURVE_NAME,
                            title=Path(args.output_dir).name)
    max_seq_length = data_args.max_source_length + data_args.max_target_length + 1
    sampling = dict(do_sample=True, top_p=0.7, max_length=max_seq_length, temperature=0.95)  # THUDM's eval settings
    if args.do_eval:
        logger.info("*** Evaluate ***")
        metrics = trainer.evaluate(metric_key_prefix="eval", **sampling)
        metrics["eval_samples"] = len(run.eval_ds)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results.update(metrics)
    if args.do_predict:
        logger.info("*** Predict ***")
        predict_results = trainer.predict(run.predict_ds, metric_key_prefix="predict", **sampling)
        metrics = predict_results.metrics
        metrics["predict_samples"] = len(run.predict_ds)
        trainer.log_metrics("predict", metrics)
        trainer.save_metrics("predict", metrics)
        results.update(metrics)
        if trainer.is_world_process_zero() and args.predict_with_generate:
            write_predictions(Path(args.output_dir) / "generated_predictions.txt",
                              predict_results.predictions, predict_results.label_ids, run.tokenizer)
    return results


def main(argv: list[str] | None = None) -> dict[str, float]:
    run = setup(argv)
    results = execute(run) if run is not None else {}
    leave_process_group()  # on success only: a failed rank must not wait in a barrier its peers never reach
    return results


def leave_process_group() -> None:
    """Under torchrun: wait for every rank (rank 0 still writes files and the loss plot), then tear the
    process group down, so no rank exits while gloo still has peers talking to it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except OutputDirError as e:  # one clear line, no traceback
        raise SystemExit(f"error: {e}") from None
