"""Evaluate a model or a classical baseline on manifest rows at native resolution.

Plain PyTorch: the evaluation job runs this inside a Ray task, tests and notebooks call it
directly.
"""

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from skimage.filters import threshold_multiotsu

from cervi_ray.data.dataset import load_eval_pair, to_tensor
from cervi_ray.data.labels import BACKGROUND, CYTOPLASM, NUCLEUS
from cervi_ray.metrics import SegmentationMetrics
from cervi_ray.report.overlays import save_overlay
from cervi_ray.tta import predict_with_tta, validate_transforms

logger = logging.getLogger(__name__)

# A predictor maps a (h, w, 3) uint8 image at the evaluation scale and the native (H, W) to
# (H, W) labels in {0, 1, 2}.
Predictor = Callable[[np.ndarray, tuple[int, int]], np.ndarray]


def model_predictor(
    model: torch.nn.Module,
    label_mode: str,
    device: str | torch.device = "cpu",
    tta: Sequence[str] | None = None,
) -> Predictor:
    """Predictor that runs `model` on the whole image and upsamples scores to native size.

    With `tta`, the views named there are averaged as softmax probabilities (cervi_ray.tta);
    without it the logits of the single view are used. The argmax is the same either way for
    a single view, because softmax keeps the order of the scores.
    """
    model = model.to(device).eval()
    transforms = validate_transforms(tta) if tta else None

    @torch.no_grad()
    def predict(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        x = to_tensor(image).unsqueeze(0).to(device)  # (h, w, 3) -> (1, 3, h, w)
        scores = model(x) if transforms is None else predict_with_tta(model, x, transforms).probs  # (1, K, h, w)
        scores = torch.nn.functional.interpolate(scores, size=size, mode="bilinear", align_corners=False)
        labels = scores.argmax(dim=1)[0].cpu().numpy().astype(np.uint8)  # (H, W)
        if label_mode == "nucleus":
            labels = np.where(labels == 1, NUCLEUS, BACKGROUND).astype(np.uint8)
        return labels

    return predict


def multi_otsu_predictor(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Classical baseline: three-class multi-Otsu on intensity, darkest class as nucleus.

    Pap-smear nuclei are the darkest structures, cytoplasm is mid-grey and the slide
    background is bright, so two Otsu thresholds give a learning-free reference segmentation.
    """
    gray = image[..., 0]
    low, high = threshold_multiotsu(gray, classes=3)
    labels = np.full(gray.shape, BACKGROUND, dtype=np.uint8)
    labels[gray <= high] = CYTOPLASM
    labels[gray <= low] = NUCLEUS
    return _resize_labels(labels, size)


def all_nucleus_predictor(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Trivial baseline: every pixel is nucleus (the best Dice a constant guess can reach)."""
    del image
    return np.full(size, NUCLEUS, dtype=np.uint8)


def _resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if labels.shape == tuple(size):
        return labels
    tensor = torch.from_numpy(labels)[None, None].float()
    resized = torch.nn.functional.interpolate(tensor, size=size, mode="nearest")
    return resized[0, 0].numpy().astype(np.uint8)


def evaluate_rows(
    predictor: Predictor,
    rows: Sequence[dict],
    scale: float,
    n_boot: int = 1000,
    overlay_dir: str | Path | None = None,
    max_overlays: int = 4,
    seed: int = 0,
) -> dict[str, Any]:
    """Score `predictor` on every row; returns SegmentationMetrics.compute() plus timing.

    Overlays (image, ground truth, prediction side by side) go to overlay_dir for the first
    `max_overlays` rows.
    """
    if not rows:
        raise ValueError("no images to evaluate: the selected split and sources are empty")
    metrics = SegmentationMetrics()
    seconds = 0.0
    overlays = []
    for index, row in enumerate(rows):
        image, mask, sample = load_eval_pair(row, scale)
        start = time.perf_counter()
        pred = predictor(image, mask.shape)
        seconds += time.perf_counter() - start
        metrics.update(pred, mask, sample.id, sample.annotation)
        if overlay_dir is not None and index < max_overlays:
            path = Path(overlay_dir) / f"{sample.id.replace('/', '__')}.png"
            save_overlay(path, sample.image, mask, pred, title=sample.id)
            overlays.append(str(path))
    result = metrics.compute(n_boot=n_boot, seed=seed)
    result["seconds_per_image"] = seconds / len(rows)
    result["overlays"] = overlays
    return result
