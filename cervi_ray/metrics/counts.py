"""Confusion counts per image and class, and the rates computed from them.

See the package docstring of cervi_ray.metrics for the evaluated classes and conventions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from cervi_ray.data.labels import BACKGROUND, CLASS_NAMES, CYTOPLASM, NUCLEUS

EvalClass = Literal["cytoplasm", "nucleus", "cell"]
EVAL_CLASSES: tuple[EvalClass, ...] = ("cytoplasm", "nucleus", "cell")
COUNT_NAMES = ("tp", "fp", "fn", "tn")
RATE_NAMES = ("sensitivity", "specificity", "accuracy", "dice", "precision")

# Classes evaluated on the images of each annotation kind.
EVALUATED_CLASSES: dict[str, tuple[EvalClass, ...]] = {
    "full": EVAL_CLASSES,
    "nucleus": ("nucleus",),
}

_MAX_LABEL = len(CLASS_NAMES) - 1


def _as_label_tensor(name: str, labels: Tensor | np.ndarray) -> Tensor:
    """Return `labels` as a tensor, raising unless it contains integer class labels in range."""
    if isinstance(labels, np.ndarray):
        labels = torch.from_numpy(labels)
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise ValueError(
            f"{name} must contain integer class labels, got dtype {labels.dtype}. "
            "Turn logits (B, K, H, W) into labels with logits.argmax(dim=1)"
        )
    if labels.numel() > 0:
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high > _MAX_LABEL:
            raise ValueError(
                f"{name} labels must be in [0, {_MAX_LABEL}] ({', '.join(CLASS_NAMES)}), "
                f"got values from {low} to {high}"
            )
    return labels


def _class_masks(labels: Tensor) -> Tensor:
    """Return boolean masks (B, 3, H * W) of the EVAL_CLASSES for label maps (B, H, W)."""
    flat_labels = labels.flatten(start_dim=1)  # (B, H * W)
    return torch.stack(
        [flat_labels == CYTOPLASM, flat_labels == NUCLEUS, flat_labels != BACKGROUND], dim=1
    )


def confusion_counts(pred: Tensor, target: Tensor) -> Tensor:
    """Count TP, FP, FN and TN pixels per image and evaluated class.

    Args:
        pred: (B, H, W) predicted labels in {0, 1, 2}.
        target: (B, H, W) ground-truth labels in {0, 1, 2}.

    Returns:
        int64 tensor (B, 3, 4) on the inputs' device. Dim 1 follows EVAL_CLASSES and
        dim 2 follows COUNT_NAMES (tp, fp, fn, tn).

    Raises:
        ValueError: if the shapes differ or are not (B, H, W), or labels are not integers
            in [0, 2].
    """
    pred = _as_label_tensor("pred", pred)
    target = _as_label_tensor("target", target)
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(
            "pred and target must both have shape (B, H, W), got "
            f"pred {tuple(pred.shape)} and target {tuple(target.shape)}"
        )
    num_pixels = pred.shape[1] * pred.shape[2]

    pred_masks = _class_masks(pred)  # (B, 3, H * W)
    target_masks = _class_masks(target)  # (B, 3, H * W)
    # Summing a bool tensor yields int64, so the counts are exact.
    tp = (pred_masks & target_masks).sum(dim=-1)  # (B, 3)
    fp = (pred_masks & ~target_masks).sum(dim=-1)
    fn = (~pred_masks & target_masks).sum(dim=-1)
    tn = num_pixels - tp - fp - fn
    return torch.stack([tp, fp, fn, tn], dim=-1)  # (B, 3, 4)


def rates_from_counts_batched(counts: Tensor | np.ndarray | Sequence[int]) -> Tensor:
    """Compute the RATE_NAMES rates from counts (..., 4) ordered (tp, fp, fn, tn).

    Returns a float64 tensor (..., 5) in RATE_NAMES order, with NaN wherever a
    denominator is zero. This function does not apply the empty ground-truth convention
    of per-image Dice, which SegmentationMetrics applies on top.

    Raises:
        ValueError: if the last dim is not 4 or a count is negative.
    """
    counts = torch.as_tensor(counts)
    if counts.ndim == 0 or counts.shape[-1] != len(COUNT_NAMES):
        raise ValueError(f"counts must have shape (..., 4) ordered {COUNT_NAMES}, got shape {tuple(counts.shape)}")
    if counts.numel() > 0 and bool((counts < 0).any()):
        raise ValueError(f"counts must be >= 0, got negative values {counts[counts < 0].tolist()}")

    tp, fp, fn, tn = counts.to(torch.float64).unbind(dim=-1)

    def ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
        return torch.where(denominator > 0, numerator / denominator, math.nan)

    return torch.stack(
        [
            ratio(tp, tp + fn),  # sensitivity
            ratio(tn, tn + fp),  # specificity
            ratio(tp + tn, tp + fp + fn + tn),  # accuracy
            ratio(2 * tp, 2 * tp + fp + fn),  # dice
            ratio(tp, tp + fp),  # precision
        ],
        dim=-1,
    )


def rates_from_counts(counts: Tensor | np.ndarray | Sequence[int]) -> dict[str, float]:
    """Compute sensitivity, specificity, accuracy, dice and precision from one (4,) counts row.

    The row is ordered (tp, fp, fn, tn). A rate with a zero denominator is NaN.
    """
    counts = torch.as_tensor(counts)
    if counts.shape != (len(COUNT_NAMES),):
        raise ValueError(f"counts must have shape (4,) ordered {COUNT_NAMES}, got shape {tuple(counts.shape)}")
    rates = rates_from_counts_batched(counts)
    return {name: float(value) for name, value in zip(RATE_NAMES, rates.tolist())}


def pixel_metrics_from_counts(counts: Tensor) -> dict[str, dict[str, float | int]]:
    """Compute pixel-level metrics from summed counts (3, 4) ordered like EVAL_CLASSES.

    Returns {class: {rate: float, "tp": int, "fp": int, "fn": int, "tn": int}} for each
    class in EVAL_CLASSES. In a distributed run, sum SegmentationMetrics.pixel_counts
    across ranks and pass the total here.
    """
    counts = torch.as_tensor(counts).cpu()
    expected_shape = (len(EVAL_CLASSES), len(COUNT_NAMES))
    if counts.shape != expected_shape:
        raise ValueError(
            f"counts must have shape {expected_shape} (EVAL_CLASSES x {COUNT_NAMES}), got {tuple(counts.shape)}"
        )
    metrics: dict[str, dict[str, float | int]] = {}
    for class_name, class_counts in zip(EVAL_CLASSES, counts):
        class_metrics: dict[str, float | int] = dict(rates_from_counts(class_counts))
        class_metrics.update({name: int(value) for name, value in zip(COUNT_NAMES, class_counts.tolist())})
        metrics[class_name] = class_metrics
    return metrics
