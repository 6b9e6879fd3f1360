"""Per-image accumulation of confusion counts, bootstrap summaries and JSON export.

See the package docstring of cervi_ray.metrics for the evaluated classes and conventions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cervi_ray.data.labels import ANNOTATIONS, BACKGROUND, CYTOPLASM, Annotation
from cervi_ray.metrics.counts import (
    COUNT_NAMES,
    EVAL_CLASSES,
    EVALUATED_CLASSES,
    RATE_NAMES,
    _as_label_tensor,
    confusion_counts,
    pixel_metrics_from_counts,
    rates_from_counts_batched,
)

_TP, _FN = COUNT_NAMES.index("tp"), COUNT_NAMES.index("fn")
_SENSITIVITY, _DICE = RATE_NAMES.index("sensitivity"), RATE_NAMES.index("dice")


def _bootstrap_summary(values: np.ndarray, resample_indices: np.ndarray, ci: float) -> dict[str, float | int]:
    """Return the mean of the defined `values` (N,) and its percentile bootstrap interval.

    `resample_indices` (n_boot, N) contains the image indices of each replicate. Replicates
    that draw no image with a defined value are dropped.
    """
    defined = ~np.isnan(values)  # (N,)
    num_defined = int(defined.sum())
    if num_defined == 0:
        return {"mean": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 0}

    values_or_zero = np.where(defined, values, 0.0)
    replicate_sums = values_or_zero[resample_indices].sum(axis=1)  # (n_boot,)
    replicate_sizes = defined[resample_indices].sum(axis=1)  # (n_boot,)
    has_values = replicate_sizes > 0
    replicate_means = replicate_sums[has_values] / replicate_sizes[has_values]

    tail_percent = 100.0 * (1.0 - ci) / 2.0  # 2.5 for ci = 0.95
    ci_low, ci_high = np.percentile(replicate_means, [tail_percent, 100.0 - tail_percent])
    return {
        "mean": float(values[defined].mean()),
        "ci_low": float(ci_low),
        "ci_high": float(ci_high),
        "n": num_defined,
    }


class SegmentationMetrics:
    """Accumulator of per-image confusion counts that computes pixel-level and per-image metrics.

    Call `update` once per batch, then `compute`. The stored counts are kept on the CPU, 12
    int64 values per image. Image ids must be unique, so evaluating the same image twice
    (for example through the padding of a DistributedSampler) raises instead of biasing
    the metrics. See the module docstring for the conventions.
    """

    def __init__(self) -> None:
        self._counts: list[Tensor] = []  # one (B, 3, 4) int64 CPU tensor per update
        self._ids: list[str] = []
        self._annotations: list[Annotation] = []
        self._seen_ids: set[str] = set()

    def __len__(self) -> int:
        """Return the number of images stored."""
        return len(self._ids)

    def reset(self) -> None:
        """Forget all stored images, for example before the next validation epoch."""
        self._counts.clear()
        self._ids.clear()
        self._annotations.clear()
        self._seen_ids.clear()

    def update(
        self,
        pred: Tensor | np.ndarray,
        target: Tensor | np.ndarray,
        ids: Sequence[str] | str,
        annotations: Sequence[Annotation] | Annotation = "full",
    ) -> None:
        """Store the confusion counts of a batch of predictions.

        Args:
            pred: (B, H, W) or (H, W) predicted labels in {0, 1, 2}, on any device.
            target: ground-truth labels of the same shape.
            ids: one unique image id per image, or a single id for a (H, W) image.
            annotations: "full" or "nucleus" per image, or one value for the whole batch.

        Raises:
            ValueError: on mismatched shapes, labels outside [0, 2], a wrong number of ids
                or annotations, an unknown annotation, an id already stored, or cytoplasm
                labels in the target of a "nucleus" image.
        """
        pred = _as_label_tensor("pred", pred)
        target = _as_label_tensor("target", target)
        if pred.shape != target.shape:
            raise ValueError(
                f"pred and target must have the same shape, got pred {tuple(pred.shape)} "
                f"and target {tuple(target.shape)}"
            )
        if pred.ndim == 2:
            pred, target = pred.unsqueeze(0), target.unsqueeze(0)  # (H, W) -> (1, H, W)
        if pred.ndim != 3:
            raise ValueError(f"pred and target must have shape (B, H, W) or (H, W), got {tuple(pred.shape)}")
        batch_size = pred.shape[0]

        ids = self._check_ids(ids, batch_size)
        annotations = self._check_annotations(annotations, batch_size)
        for image_id, annotation, image_target in zip(ids, annotations, target):
            if annotation == "nucleus" and bool((image_target == CYTOPLASM).any()):
                raise ValueError(
                    f"image {image_id!r} is annotated 'nucleus' but its target contains cytoplasm "
                    f"labels ({CYTOPLASM}). Pass annotation 'full' for it, or map its non-nucleus "
                    f"labels to {BACKGROUND}"
                )

        self._counts.append(confusion_counts(pred, target).cpu())
        self._ids.extend(ids)
        self._seen_ids.update(ids)
        self._annotations.extend(annotations)

    def _check_ids(self, ids: Sequence[str] | str, batch_size: int) -> list[str]:
        if isinstance(ids, str):
            if batch_size != 1:
                raise ValueError(
                    f"got the single id {ids!r} for a batch of {batch_size} images. Pass a list of "
                    f"{batch_size} ids"
                )
            ids = [ids]
        ids = list(ids)
        for image_id in ids:
            if not isinstance(image_id, str):
                raise ValueError(f"ids must be strings, got {image_id!r} of type {type(image_id).__name__}")
        if len(ids) != batch_size:
            raise ValueError(f"ids must contain one id per image, got {len(ids)} ids for a batch of {batch_size}")
        duplicates = sorted({image_id for image_id in ids if image_id in self._seen_ids or ids.count(image_id) > 1})
        if duplicates:
            raise ValueError(
                f"image ids must be unique, got {duplicates} more than once. Drop repeated "
                "images (such as sampler padding) or call reset() before a new evaluation"
            )
        return ids

    @staticmethod
    def _check_annotations(annotations: Sequence[Annotation] | Annotation, batch_size: int) -> list[Annotation]:
        if isinstance(annotations, str):
            annotations = [annotations] * batch_size
        annotations = list(annotations)
        if len(annotations) != batch_size:
            raise ValueError(
                f"annotations must contain one value per image, got {len(annotations)} for a batch "
                f"of {batch_size}"
            )
        for annotation in annotations:
            if annotation not in ANNOTATIONS:
                raise ValueError(f"annotation must be one of {ANNOTATIONS}, got {annotation!r}")
        return annotations

    def image_counts(self) -> Tensor:
        """Return the stored counts (N, 3, 4) int64, including classes that are not evaluated."""
        if not self._counts:
            return torch.zeros(0, len(EVAL_CLASSES), len(COUNT_NAMES), dtype=torch.int64)
        return torch.cat(self._counts, dim=0)

    def _evaluated_mask(self) -> Tensor:
        """Return a bool mask (N, 3) of the classes evaluated on each image."""
        rows = [[name in EVALUATED_CLASSES[annotation] for name in EVAL_CLASSES] for annotation in self._annotations]
        return torch.tensor(rows, dtype=torch.bool).reshape(len(rows), len(EVAL_CLASSES))

    def pixel_counts(self) -> Tensor:
        """Return the int64 counts (3, 4) summed over the images that evaluate each class.

        With no image stored, the counts are zeros, so every rank of a distributed run can
        sum them (for example with torch.distributed.all_reduce after moving them to the
        device) and pass the total to `pixel_metrics_from_counts`.
        """
        counts = self.image_counts()  # (N, 3, 4)
        evaluated = self._evaluated_mask().unsqueeze(-1)  # (N, 3, 1)
        return torch.where(evaluated, counts, 0).sum(dim=0, dtype=torch.int64)

    def compute(self, n_boot: int = 1000, seed: int = 0, ci: float = 0.95) -> dict[str, Any]:
        """Compute pixel-level metrics, per-image means with bootstrap intervals, and image records.

        Args:
            n_boot: number of bootstrap replicates, >= 1.
            seed: seed of numpy's default_rng for the resampling, so results repeat exactly.
            ci: confidence level of the percentile interval, in (0, 1).

        Returns:
            A dict with three keys. NaN marks undefined values, and `to_jsonable` turns it into None.

            - "pixel": {class: {rate: float, "tp": int, "fp": int, "fn": int, "tn": int}}.
            - "per_image": {class: {rate: {"mean": float, "ci_low": float, "ci_high": float, "n": int}}}.
            - "images": one {"id": str, "annotation": str, class: {rate: float, "tp": int, ...}}
              per image in update order, holding only the classes evaluated on that image.

        Raises:
            ValueError: if no image was stored, or n_boot or ci is out of range.
        """
        if not self._ids:
            raise ValueError("no images to evaluate. Call update() with predictions before compute()")
        if n_boot < 1:
            raise ValueError(f"n_boot must be >= 1, got {n_boot}")
        if not 0.0 < ci < 1.0:
            raise ValueError(f"ci must be in (0, 1), got {ci}")

        # Per-image rates (N, 3, 5) with the conventions applied.
        counts = self.image_counts()  # (N, 3, 4)
        evaluated = self._evaluated_mask().numpy()  # (N, 3)
        rates = rates_from_counts_batched(counts).numpy()  # (N, 3, 5)
        rates[~evaluated] = math.nan
        empty_ground_truth = (counts[..., _TP] + counts[..., _FN] == 0).numpy()  # (N, 3)
        rates[empty_ground_truth, _DICE] = math.nan
        rates[empty_ground_truth, _SENSITIVITY] = math.nan

        # Per-image means. Every class and rate shares the same replicates.
        num_images = len(self._ids)
        resample_indices = np.random.default_rng(seed).integers(0, num_images, size=(n_boot, num_images))
        per_image = {
            class_name: {
                rate_name: _bootstrap_summary(rates[:, class_index, rate_index], resample_indices, ci)
                for rate_index, rate_name in enumerate(RATE_NAMES)
            }
            for class_index, class_name in enumerate(EVAL_CLASSES)
        }

        # Image records.
        images: list[dict[str, Any]] = []
        for image_index, (image_id, annotation) in enumerate(zip(self._ids, self._annotations)):
            record: dict[str, Any] = {"id": image_id, "annotation": annotation}
            for class_index, class_name in enumerate(EVAL_CLASSES):
                if not evaluated[image_index, class_index]:
                    continue
                class_record: dict[str, float | int] = {
                    name: float(rates[image_index, class_index, rate_index])
                    for rate_index, name in enumerate(RATE_NAMES)
                }
                class_counts = counts[image_index, class_index].tolist()
                class_record.update({name: int(value) for name, value in zip(COUNT_NAMES, class_counts)})
                record[class_name] = class_record
            images.append(record)

        return {
            "pixel": pixel_metrics_from_counts(self.pixel_counts()),
            "per_image": per_image,
            "images": images,
        }


def to_jsonable(result: Any) -> Any:
    """Return a copy of a `compute` result that json.dumps accepts, with NaN turned into None.

    Dicts, lists and tuples are copied recursively (tuples become lists), and numpy scalars
    become Python numbers.
    """
    if isinstance(result, dict):
        return {key: to_jsonable(value) for key, value in result.items()}
    if isinstance(result, (list, tuple)):
        return [to_jsonable(value) for value in result]
    if isinstance(result, np.generic):
        result = result.item()
    if isinstance(result, float) and math.isnan(result):
        return None
    return result
