"""Training augmentation: flips, rotation, colour jitter and random occlusion.

Geometric transforms move image and mask together, with nearest-neighbour interpolation for
the mask so no new label value appears. Colour jitter and occlusion change the image only.
"""

from __future__ import annotations

import logging
import math
import random
from typing import Any

import albumentations as A
import cv2
import numpy as np

logger = logging.getLogger(__name__)

_SHAPES = ("ellipse", "polygon", "rectangle")


class RandomOcclusion(A.ImageOnlyTransform):
    """Paint 1 to `max_count` random ellipses, polygons and rotated rectangles in random greys.

    The shapes imitate debris and overlapping cells that hide part of a cell. Each shape fits
    in a circle whose diameter is `min_size` to `max_size` times the shorter image side. The
    mask is never changed.
    """

    def __init__(self, max_count: int = 4, max_size: float = 0.25, min_size: float = 0.02, p: float = 0.5):
        super().__init__(p=p)
        if isinstance(max_count, bool) or not isinstance(max_count, (int, np.integer)) or max_count < 1:
            raise ValueError(f"max_count must be an integer >= 1, got {max_count!r}")
        if not 0 < max_size <= 1:
            raise ValueError(f"max_size must be in (0, 1] (a fraction of the image side), got {max_size!r}")
        if not 0 < min_size <= max_size:
            raise ValueError(f"min_size must be in (0, max_size={max_size}], got {min_size!r}")
        self.max_count = max_count
        self.max_size = max_size
        self.min_size = min_size

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("max_count", "max_size", "min_size")

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        side = min(height, width)
        rng = self.random_generator
        polygons = []
        for _ in range(int(rng.integers(1, self.max_count + 1))):
            shape = _SHAPES[int(rng.integers(len(_SHAPES)))]
            radius = 0.5 * side * rng.uniform(self.min_size, self.max_size)
            centre = (rng.uniform(0, width), rng.uniform(0, height))  # (x, y)
            points = _shape_outline(shape, centre, radius, rng)
            grey = int(rng.integers(0, 256))
            polygons.append((points, grey))
        return {"polygons": polygons}

    def apply(self, img: np.ndarray, polygons: list[tuple[np.ndarray, int]] = (), **params: Any) -> np.ndarray:
        occluded = img.copy()
        for points, grey in polygons:
            value = grey if img.dtype == np.uint8 else grey / 255.0
            colour = (value,) * (img.shape[2] if img.ndim == 3 else 1)
            cv2.fillPoly(occluded, [points], colour)
        return occluded


def _shape_outline(shape: str, centre: tuple[float, float], radius: float, rng: np.random.Generator) -> np.ndarray:
    """Return the (K, 2) int32 (x, y) vertices of one occluding shape."""
    angle = rng.uniform(0, 2 * math.pi)
    if shape == "ellipse":
        # Axis ratio between 0.4 and 1: from elongated debris to round cells.
        theta = np.linspace(0, 2 * math.pi, 32, endpoint=False)
        x, y = radius * np.cos(theta), radius * rng.uniform(0.4, 1.0) * np.sin(theta)
    elif shape == "polygon":
        # Star-shaped irregular polygon: 3 to 8 vertices at sorted random angles and radii.
        theta = np.sort(rng.uniform(0, 2 * math.pi, int(rng.integers(3, 9))))
        radii = radius * rng.uniform(0.4, 1.0, theta.size)
        x, y = radii * np.cos(theta), radii * np.sin(theta)
    else:
        # Corners lie on the circle. Corner angles of 0.1 pi to 0.25 pi give aspect ratios 3:1 to 1:1.
        corner = rng.uniform(0.1 * math.pi, 0.25 * math.pi)
        half_width, half_height = radius * math.cos(corner), radius * math.sin(corner)
        x = np.array([-half_width, half_width, half_width, -half_width])
        y = np.array([-half_height, -half_height, half_height, half_height])
    # Rotate by `angle`, then move to the centre.
    cos, sin = math.cos(angle), math.sin(angle)
    points = np.stack([centre[0] + cos * x - sin * y, centre[1] + sin * x + cos * y], axis=1)
    return np.round(points).astype(np.int32)


def seed_augmentation(augment: Any, seed: int) -> None:
    """Seed an albumentations transform or pipeline. Other callables are left unchanged.

    Every transform gets the same pair of generators (numpy and Python), so successive draws
    differ. Compose(seed=...) in albumentations 2.0.8 instead seeds each transform with the
    same seed, so HorizontalFlip and VerticalFlip draw equal numbers and always flip together.
    """
    if hasattr(augment, "set_random_state"):
        augment.set_random_state(np.random.default_rng(seed), random.Random(seed))


def _check_probability(name: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")


def build_train_augmentation(
    hflip_p: float = 0.5,
    vflip_p: float = 0.5,
    rotate_limit: float = 45,
    rotate_p: float = 0.5,
    occlusion_p: float = 0.5,
    occlusion_max_count: int = 4,
    occlusion_max_size: float = 0.25,
    brightness: float = 0.2,
    contrast: float = 0.2,
    saturation: float = 0.2,
    jitter_p: float = 0.5,
    seed: int | None = None,
) -> A.Compose:
    """Build the training pipeline, called as aug(image=(H, W, 3) uint8, mask=(H, W)).

    rotate_limit is in degrees (rotation angle uniform in +-rotate_limit). Borders exposed by
    rotation are filled by reflect-101 in image and mask alike. brightness, contrast and
    saturation draw a factor uniformly from [1 - value, 1 + value]. occlusion_max_size is a
    fraction of the shorter image side. `seed` makes the sequence of outputs reproducible.
    """
    for name, value in (
        ("hflip_p", hflip_p),
        ("vflip_p", vflip_p),
        ("rotate_p", rotate_p),
        ("occlusion_p", occlusion_p),
        ("jitter_p", jitter_p),
    ):
        _check_probability(name, value)
    if not 0 <= rotate_limit <= 180:
        raise ValueError(f"rotate_limit must be in [0, 180] degrees, got {rotate_limit!r}")
    for name, value in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must be in [0, 1] (factor drawn from [1 - {name}, 1 + {name}]), got {value!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be None or an integer >= 0, got {seed!r}")

    transforms = [
        A.HorizontalFlip(p=hflip_p),
        A.VerticalFlip(p=vflip_p),
        A.Rotate(
            limit=(-rotate_limit, rotate_limit),
            interpolation=cv2.INTER_LINEAR,
            mask_interpolation=cv2.INTER_NEAREST,
            border_mode=cv2.BORDER_REFLECT_101,
            p=rotate_p,
        ),
        A.ColorJitter(
            brightness=(1 - brightness, 1 + brightness),
            contrast=(1 - contrast, 1 + contrast),
            saturation=(1 - saturation, 1 + saturation),
            hue=(0.0, 0.0),
            p=jitter_p,
        ),
        RandomOcclusion(
            max_count=occlusion_max_count,
            max_size=occlusion_max_size,
            min_size=min(0.02, occlusion_max_size),
            p=occlusion_p,
        ),
    ]
    # mask_interpolation on Compose overrides every transform's mask interpolation.
    pipeline = A.Compose(transforms, mask_interpolation=cv2.INTER_NEAREST)
    if seed is not None:
        seed_augmentation(pipeline, seed)
    return pipeline
