"""Loss curve PNG from the Trainer's log history (trainer_state.json's `log_history`)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

LOSS_CURVE_NAME = "loss_curve.png"


def loss_points(log_history: Sequence[dict], key: str = "loss") -> tuple[list[int], list[float]]:
    pts = [(int(e["step"]), float(e[key])) for e in log_history if key in e and "step" in e]
    return [s for s, _ in pts], [v for _, v in pts]


def plot_loss_curve(log_history: Sequence[dict], path: str | Path, title: str = "") -> Path | None:
    """Write train (and eval, if logged) loss against step; None when nothing was logged."""
    steps, losses = loss_points(log_history)
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, marker="o" if len(steps) < 30 else None, label="train loss")
    eval_steps, eval_losses = loss_points(log_history, "eval_loss")
    if eval_steps:
        ax.plot(eval_steps, eval_losses, marker="s", label="eval loss")
    ax.set_xlabel("optimization step")
    ax.set_ylabel("loss")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
