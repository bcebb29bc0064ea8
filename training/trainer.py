"""PrefixTrainer: transformers' Seq2SeqTrainer with ChatGLM2's parts (reference §6.4, §7.1).

- Checkpoints hold only the prefix encoder in THUDM's layout (or the whole model for a full
  fine-tune), the tokenizer, the trainer state and `ptuning_manifest.json`.
- A checkpoint is written into `output_dir/.staging/checkpoint-N`, completed with the manifest,
  fsynced, then renamed to `output_dir/checkpoint-N`: a crash mid-save leaves no visible folder.
- Generation for --predict_with_generate runs chatglm.generation on the prefixed base.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Seq2SeqTrainer
from transformers.trainer_utils import rotate_checkpoints

from chatglm.checkpoint import iter_tensors, load_prefix_encoder, save_model, save_prefix, weight_files
from chatglm.generation import generate
from chatglm.quant_format import QuantMode
from chatglm.tokenizer import ChatGLMTokenizer

from .logs import use_thudm_printing
from .manifest import MANIFEST_NAME, PTuningManifest
from .model_setup import PTuningModel, trained_config

logger = logging.getLogger(__name__)
STAGING_DIR = ".staging"
TOP_K = 50  # transformers' default generation config, active in THUDM's eval generate()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def publish(staged: Path, final: Path) -> None:
    """Rename a finished folder into place; an older folder of the same name is swapped out first."""
    _fsync_tree(staged)
    if final.exists():  # --overwrite_output_dir over an earlier run
        old = staged.with_name(staged.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, final)
    _fsync_dir(final.parent)


class PrefixTrainer(Seq2SeqTrainer):
    def __init__(self, *args: Any, tokenizer: ChatGLMTokenizer, manifest: PTuningManifest,
                 quantization: QuantMode = QuantMode.NONE, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.glm_tokenizer = tokenizer
        self.manifest = manifest
        self.quantization = quantization
        self._staging = False
        use_thudm_printing(self)

    @property
    def ptuning_model(self) -> PTuningModel:
        return self.accelerator.unwrap_model(self.model)

    # ---- saving --------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:
            return
        folder = Path(output_dir or self.args.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        logger.info(f"Saving model checkpoint to {folder}")
        model = self.ptuning_model
        if model.prefix_encoder is not None:
            print("Saving PrefixEncoder")
            save_prefix(model.prefix_encoder, folder, trained_config(model, self.quantization))
        else:
            print("Saving the whole model")
            save_model(model.base, folder, safetensors=self.args.save_safetensors)
            generation = {"_from_model_config": True, "eos_token_id": model.glm_config.eos_token_id,
                          "pad_token_id": model.glm_config.pad_token_id}
            (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        self.glm_tokenizer.save(folder)
        torch.save(self.args, folder / "training_args.bin")

    def _get_output_dir(self, trial: Any) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING_DIR) if self._staging else run_dir

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        run_dir = Path(super()._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        staged = run_dir / STAGING_DIR / name
        if self.args.should_save:
            shutil.rmtree(staged, ignore_errors=True)  # leftovers of a killed run
        self.accelerator.wait_for_everyone()
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)  # every rank adds its rng_state*.pth
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            best = self.state.best_model_checkpoint
            if best and Path(best).parent == staged.parent:
                self.state.best_model_checkpoint = str(run_dir / Path(best).name)
                self.state.save_to_json(str(staged / "trainer_state.json"))
            self.manifest.write(staged)  # last file: marks the folder complete
            publish(staged, run_dir / name)
            with contextlib.suppress(OSError):
                staged.parent.rmdir()  # only when empty
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()

    # ---- loading (resume, best model) ---------------------------------------------------------
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        folder = Path(resume_from_checkpoint)
        target = self.accelerator.unwrap_model(model) if model is not None else self.ptuning_model
        if (folder / MANIFEST_NAME).is_file():
            saved = PTuningManifest.read(folder)
            if saved.base_config_hash != self.manifest.base_config_hash:
                raise ValueError(f"{folder} was trained on a different base ({saved.base_model}): "
                                 "its base config.json hash does not match the current --model_name_or_path")
        if target.prefix_encoder is not None:
            loaded = load_prefix_encoder(folder, target.glm_config)
            target.prefix_encoder.load_state_dict(loaded.state_dict())
        else:
            state = {k: v for f in weight_files(folder) for k, v in iter_tensors(f)}
            target.base.load_state_dict(state, strict=True)

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    # ---- generation -----------------------------------------------------------------------
    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None, **gen_kwargs: Any):
        """THUDM's trainer_seq2seq step: generate after the prompt, right-pad generated ids and labels
        to max_length with pad id 0; no loss."""
        if not self.args.predict_with_generate or prediction_loss_only:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        inputs = self._prepare_inputs(inputs)
        kw = {**getattr(self, "_gen_kwargs", {}), **gen_kwargs}
        if (kw.get("num_beams") or 1) > 1:
            raise ValueError("beam search is not supported: use --num_beams 1")
        ids = inputs["input_ids"]  # [B, T] left-padded
        max_length = kw.get("max_length")
        max_new = kw.get("max_new_tokens") or max((max_length or 0) - ids.shape[1], 0)
        glm = self.ptuning_model
        glm.eval()
        with torch.no_grad():
            prefix = glm.prefix(ids.shape[0])
            new = generate(glm.base, ids, inputs.get("attention_mask"), inputs.get("position_ids"), prefix=prefix,
                           max_new_tokens=max_new, do_sample=bool(kw.get("do_sample", False)),
                           temperature=float(kw.get("temperature", 1.0)), top_k=int(kw.get("top_k", TOP_K)),
                           top_p=float(kw.get("top_p", 1.0)), eos_token_id=self.glm_tokenizer.eos_id,
                           pad_token_id=self.glm_tokenizer.pad_id) if max_new > 0 else [[] for _ in ids]
        width = max_length if max_length is not None else max_new + 1
        pad = self.glm_tokenizer.pad_id
        generated = torch.full((ids.shape[0], max(width, max(map(len, new), default=0))), pad, dtype=torch.long)
        for row, toks in enumerate(new):
            generated[row, : len(toks)] = torch.tensor(toks, dtype=torch.long)
        labels = inputs.get("labels")
        if labels is not None and labels.shape[1] < generated.shape[1]:
            grown = torch.full((labels.shape[0], generated.shape[1]), pad, dtype=labels.dtype, device=labels.device)
            grown[:, : labels.shape[1]] = labels
            labels = grown
        return None, generated.to(ids.device), labels

