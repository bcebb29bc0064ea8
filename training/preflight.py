"""Checks that run before training starts, so a run that could never save a checkpoint stops at once with
one clear line instead of failing at its first save (and losing the steps before it):

- the output folder can be created and written (a probe file is written, fsynced and removed);
- its disk has room for a checkpoint: the trainable weights, their two Adam moments, the tokenizer and
  the trainer's small files, twice (a checkpoint is staged next to the previous one before rotation).
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from torch import nn

MIB = 1024 * 1024
SMALL_FILES = 1 * MIB  # trainer_state.json, rng_state.pth, scheduler.pt, configs, manifest
PROBE = ".write-probe"


class OutputDirError(ValueError):
    """--output_dir cannot hold this run's checkpoints."""


def check_writable(output_dir: str | Path) -> None:
    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / PROBE
        with probe.open("wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputDirError(f"--output_dir {out}: its disk is full ({e.strerror}); free space or choose "
                                 "another --output_dir") from None
        raise OutputDirError(f"--output_dir {out} is not writable: {e.strerror or e} "
                             f"({type(e).__name__}); choose a folder this user can write") from None


def checkpoint_bytes(model: nn.Module, tokenizer_folder: str | Path) -> int:
    """About one checkpoint: trainable tensors saved once plus two optimizer moments, tokenizer, small files."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    tokenizer = Path(tokenizer_folder, "tokenizer.model")
    return 3 * trainable + (tokenizer.stat().st_size if tokenizer.is_file() else 0) + SMALL_FILES


def check_free_space(output_dir: str | Path, one_checkpoint: int) -> None:
    need = 2 * one_checkpoint
    free = shutil.disk_usage(output_dir).free
    if free < need:
        raise OutputDirError(
            f"--output_dir {output_dir}: {free / MIB:.1f} MiB free on its disk, but a checkpoint of this run "
            f"needs about {one_checkpoint / MIB:.1f} MiB and one is staged next to the previous one "
            f"({need / MIB:.1f} MiB); free space or choose another --output_dir")
