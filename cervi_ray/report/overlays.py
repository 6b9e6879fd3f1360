"""Overlay PNGs: image, ground truth and prediction side by side."""

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cervi_ray.data.labels import CYTOPLASM, NUCLEUS

# RGB colours blended over the grey image: cytoplasm green, nucleus magenta.
LABEL_COLOURS = {CYTOPLASM: (40, 200, 80), NUCLEUS: (220, 30, 200)}
BLEND = 0.45  # weight of the label colour in labelled pixels
MAX_SIDE = 512  # overlays are downsampled so each panel is at most this wide


def colourise(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Blend label colours over an (H, W, 3) uint8 image; returns (H, W, 3) uint8."""
    out = image.astype(np.float32).copy()
    for label, colour in LABEL_COLOURS.items():
        where = labels == label
        out[where] = (1 - BLEND) * out[where] + BLEND * np.array(colour, dtype=np.float32)
    return out.clip(0, 255).astype(np.uint8)


def save_overlay(path: str | Path, image: np.ndarray, truth: np.ndarray, pred: np.ndarray, title: str = "") -> Path:
    """Write image | ground truth | prediction as one PNG (panels at most MAX_SIDE wide)."""
    if image.shape[:2] != truth.shape or truth.shape != pred.shape:
        raise ValueError(
            f"overlay needs image, truth and prediction of one size, got {image.shape[:2]}, "
            f"{truth.shape} and {pred.shape}"
        )
    panels = [image, colourise(image, truth), colourise(image, pred)]
    height, width = truth.shape
    factor = min(1.0, MAX_SIDE / max(height, width))
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    header = 18
    canvas = Image.new("RGB", (3 * size[0], size[1] + header), "white")
    draw = ImageDraw.Draw(canvas)
    for index, (panel, name) in enumerate(zip(panels, ("image", "ground truth", "prediction"))):
        canvas.paste(Image.fromarray(panel).resize(size, Image.Resampling.BILINEAR), (index * size[0], header))
        draw.text((index * size[0] + 4, 3), f"{name}  {title}" if index == 0 else name, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
