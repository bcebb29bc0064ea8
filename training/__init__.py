"""P-Tuning v2 (and full fine-tuning) of ChatGLM2 on transformers' Trainer: `python -m training.run`."""
