"""Console output as THUDM's main.py under transformers 4.30 shows it: INFO logging on the main
process (so the Trainer's `***** Running training *****` block appears), and loss lines printed as
`{'loss': 3.0614, 'learning_rate': 0.018, 'epoch': 4.21}` (5.x prints stringified values plus grad_norm)."""
from __future__ import annotations

import logging
import sys

import transformers
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .arguments import PTuningTrainingArguments

ROUNDING = {"loss": 4, "epoch": 2}  # what 4.30's Trainer.log rounded
HIDDEN = ("grad_norm", "total_flos")  # 4.30 had no grad_norm; the progress callback popped total_flos


def setup_logging(args: PTuningTrainingArguments) -> None:
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
                        datefmt="%m/%d/%Y %H:%M:%S", handlers=[logging.StreamHandler(sys.stdout)])
    if args.should_log:  # passive log_level means INFO on the main process, as THUDM sets it
        transformers.utils.logging.set_verbosity_info()
    level = args.get_process_log_level()
    logging.getLogger("training").setLevel(level)
    transformers.utils.logging.set_verbosity(level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()


def thudm_log_line(logs: dict) -> str:
    shown = {k: (round(v, ROUNDING[k]) if k in ROUNDING and isinstance(v, float) else v)
             for k, v in logs.items() if k not in HIDDEN}
    return str(shown)


class ThudmProgressCallback(ProgressCallback):
    """tqdm progress bar; log dicts written above it in 4.30's format."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None:
            self.training_bar.write(thudm_log_line(logs or {}))


class ThudmPrinterCallback(PrinterCallback):
    """--disable_tqdm: plain prints in 4.30's format."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_local_process_zero:
            print(thudm_log_line(logs or {}))


def use_thudm_printing(trainer: transformers.Trainer) -> None:
    """Swap the Trainer's default progress/printer callback for the 4.30-format ones."""
    for default, ours in ((ProgressCallback, ThudmProgressCallback), (PrinterCallback, ThudmPrinterCallback)):
        if any(type(cb) is default for cb in trainer.callback_handler.callbacks):
            trainer.remove_callback(default)
            trainer.add_callback(ours)
