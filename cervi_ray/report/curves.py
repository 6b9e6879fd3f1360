"""Training curves (loss and validation Dice against epoch) as PNG."""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on training nodes
import matplotlib.pyplot as plt  # noqa: E402

DICE_SERIES = ("val_dice", "val_dice_cytoplasm", "val_dice_nucleus", "val_dice_cell")


def plot_training_curves(history: Sequence[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Plot train loss per epoch and validation Dice per validation epoch to `path`."""
    if not history:
        raise ValueError(f"no training history to plot for {title}")
    epochs = [entry["epoch"] for entry in history]
    figure, (loss_axis, dice_axis) = plt.subplots(1, 2, figsize=(10, 3.6))
    loss_axis.plot(epochs, [entry["train_loss"] for entry in history], marker=".")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("training loss")
    loss_axis.grid(alpha=0.3)

    validated = [entry for entry in history if "val_dice" in entry]
    for series in DICE_SERIES:
        values = [entry.get(series) for entry in validated]
        if any(value is not None for value in values):
            dice_axis.plot([entry["epoch"] for entry in validated], values, marker="o", label=series)
    dice_axis.set_xlabel("epoch")
    dice_axis.set_ylabel("validation Dice")
    dice_axis.set_ylim(0, 1)
    dice_axis.grid(alpha=0.3)
    dice_axis.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
