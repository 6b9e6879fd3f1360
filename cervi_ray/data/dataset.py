"""PyTorch dataset over manifest rows: rescale, crop or resize, augment, normalise.

The images of these data sets are few (tens) and small (1024 x 1024 at most), so every
sample is loaded once when the dataset is built and kept in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from cervi_ray.data.augment import seed_augmentation
from cervi_ray.data.labels import NUCLEUS
from cervi_ray.data.manifest import load_sample
from cervi_ray.data.sample import Sample

logger = logging.getLogger(__name__)

# ImageNet channel mean and std, the usual input normalisation of ImageNet-pretrained encoders.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)

LabelMode = Literal["full", "nucleus"]
LABEL_MODES = ("full", "nucleus")


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """Convert an (H, W, 3) uint8 image to a (3, H, W) float32 tensor normalised with IMAGE_MEAN/STD."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be an (H, W, 3) uint8 array, got shape {image.shape} and dtype {image.dtype}")
    scaled = image.astype(np.float32) / 255.0
    normalised = (scaled - np.asarray(IMAGE_MEAN, dtype=np.float32)) / np.asarray(IMAGE_STD, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))  # (H, W, 3) -> (3, H, W)


def _resize(
    image: np.ndarray, mask: np.ndarray | None, height: int, width: int
) -> tuple[np.ndarray, np.ndarray | None]:
    # INTER_AREA averages pixels when shrinking, which avoids aliasing. INTER_LINEAR enlarges.
    shrinking = height * width < image.shape[0] * image.shape[1]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    resized_image = cv2.resize(image, (width, height), interpolation=interpolation)  # cv2 takes (W, H)
    resized_mask = None
    if mask is not None:
        resized_mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)
    return resized_image, resized_mask


def rescale(
    image: np.ndarray, mask: np.ndarray | None, scale: float
) -> tuple[np.ndarray, np.ndarray | None]:
    """Resize an (H, W, 3) image and its (H, W) mask by `scale`, the mask by nearest neighbour.

    The new size is round(H * scale) x round(W * scale), at least 1 x 1. Scale 1.0 returns
    the inputs themselves, not copies.
    """
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    if scale == 1.0:
        return image, mask
    height = max(1, round(image.shape[0] * scale))
    width = max(1, round(image.shape[1] * scale))
    return _resize(image, mask, height, width)


def load_eval_pair(row: Mapping[str, Any], scale: float) -> tuple[np.ndarray, np.ndarray, Sample]:
    """Load a sample for evaluation: (model input rescaled by `scale`, full-resolution mask, sample).

    Metrics are computed at native resolution, so the prediction must be resized back to
    the mask's size.
    """
    sample = load_sample(row)
    image, _ = rescale(sample.image, None, scale)
    return image, sample.mask, sample


def _check_positive_int(name: str, value: Any, optional: bool = True) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        expected = "None or an integer >= 1" if optional else "an integer >= 1"
        raise ValueError(f"{name} must be {expected}, got {value!r}")


class SegmentationDataset(Dataset):
    """Manifest rows as {"image": (3, H, W) float32, "mask": (H, W) int64, "id": str}.

    Each item is rescaled by `scale` (once, at load), then either randomly cropped to
    crop_size x crop_size or resized to resize_to x resize_to, then augmented. Crops are
    centred on a random foreground pixel with probability foreground_crop_p, otherwise
    placed uniformly. label_mode "nucleus" turns masks into 0 = not nucleus, 1 = nucleus.

    Random crops come from a generator seeded with (seed, epoch, DataLoader worker id), and
    the dataset reseeds `augment` from it when the generator changes, so DataLoader workers do
    not repeat each other. Call set_epoch before each epoch, and give each distributed rank its
    own seed. NOTE: DataLoader workers copy the dataset when they start, so with
    persistent_workers=True set_epoch does not reach them.
    """

    def __init__(
        self,
        rows: Sequence[Mapping[str, Any]] | pd.DataFrame,
        scale: float = 1.0,
        crop_size: int | None = None,
        resize_to: int | None = None,
        augment: Callable[..., dict[str, Any]] | None = None,
        repeats: int = 1,
        label_mode: LabelMode = "full",
        foreground_crop_p: float = 0.5,
        seed: int = 0,
    ):
        records = rows.to_dict("records") if isinstance(rows, pd.DataFrame) else [dict(row) for row in rows]
        self._check_arguments(records, scale, crop_size, resize_to, repeats, label_mode, foreground_crop_p, seed)
        self.crop_size = crop_size
        self.resize_to = resize_to
        self.augment = augment
        self.repeats = repeats
        self.label_mode = label_mode
        self.foreground_crop_p = foreground_crop_p
        self.seed = seed
        self.epoch = 0
        self._rng: np.random.Generator | None = None
        self._rng_key: tuple[int, int] | None = None

        # Load every image once. Only image, mask and id stay in memory.
        self.ids: list[str] = []
        self.images: list[np.ndarray] = []  # (H, W, 3) uint8
        self.masks: list[np.ndarray] = []  # (H, W) uint8
        self._foreground: list[np.ndarray] = []  # flat indices of mask > 0
        for row in records:
            sample = load_sample(row)
            image, mask = rescale(sample.image, sample.mask, scale)
            if label_mode == "nucleus":
                mask = (mask == NUCLEUS).astype(np.uint8)
            self.ids.append(sample.id)
            self.images.append(image)
            self.masks.append(mask)
            self._foreground.append(np.flatnonzero(mask).astype(np.int32))
        megabytes = sum(i.nbytes + m.nbytes for i, m in zip(self.images, self.masks)) / 2**20
        logger.info("Loaded %d images (%.0f MB) at scale %g", len(self.ids), megabytes, scale)

    @staticmethod
    def _check_arguments(
        records: list[dict[str, Any]],
        scale: float,
        crop_size: int | None,
        resize_to: int | None,
        repeats: int,
        label_mode: str,
        foreground_crop_p: float,
        seed: int,
    ) -> None:
        if not records:
            raise ValueError("rows must contain at least one manifest row")
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale!r}")
        _check_positive_int("crop_size", crop_size)
        _check_positive_int("resize_to", resize_to)
        if crop_size is not None and resize_to is not None:
            raise ValueError(
                f"crop_size ({crop_size}) and resize_to ({resize_to}) are mutually exclusive: "
                f"crop for training at native scale, or resize whole images, not both"
            )
        _check_positive_int("repeats", repeats, optional=False)
        if label_mode not in LABEL_MODES:
            raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
        if not 0 <= foreground_crop_p <= 1:
            raise ValueError(f"foreground_crop_p must be in [0, 1], got {foreground_crop_p!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        if label_mode == "full":
            for row in records:
                if row.get("annotation") == "nucleus":
                    raise ValueError(
                        f"Sample {row['id']} has only nuclei annotated, so label_mode 'full' would "
                        f"teach its cytoplasm as background. Pin its source to the test split or "
                        f"use label_mode 'nucleus'."
                    )

    def __len__(self) -> int:
        return len(self.ids) * self.repeats

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that seeds crops and augmentation from the next item on."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        self.epoch = int(epoch)

    def _generator(self) -> np.random.Generator:
        worker = torch.utils.data.get_worker_info()
        worker_id = -1 if worker is None else worker.id
        key = (self.epoch, worker_id)
        if self._rng is None or self._rng_key != key:
            self._rng = np.random.default_rng([self.seed, self.epoch, worker_id + 1])
            self._rng_key = key
            if self.augment is not None:
                seed_augmentation(self.augment, int(self._rng.integers(2**31)))
        return self._rng

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for a dataset of length {len(self)}")
        image_index = index % len(self.ids)
        image = self.images[image_index]
        mask = self.masks[image_index]
        rng = self._generator()

        if self.crop_size is not None:
            image, mask = self._random_crop(image, mask, self._foreground[image_index], rng)
        elif self.resize_to is not None:
            image, mask = _resize(image, mask, self.resize_to, self.resize_to)
        if self.augment is not None:
            augmented = self.augment(image=image, mask=mask)
            image, mask = augmented["image"], augmented["mask"]

        return {
            "image": to_tensor(image),
            "mask": torch.from_numpy(mask.astype(np.int64)),  # astype copies, so stored masks stay intact
            "id": self.ids[image_index],
        }

    def _random_crop(
        self, image: np.ndarray, mask: np.ndarray, foreground: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        size = self.crop_size
        height, width = mask.shape

        # Reflect-pad images smaller than the crop. Foreground indices then shift by the padding.
        pad_top = max(0, size - height) // 2
        pad_left = max(0, size - width) // 2
        if height < size or width < size:
            pad_rows = (pad_top, max(0, size - height) - pad_top)
            pad_cols = (pad_left, max(0, size - width) - pad_left)
            image = np.pad(image, (pad_rows, pad_cols, (0, 0)), mode="reflect")
            mask = np.pad(mask, (pad_rows, pad_cols), mode="reflect")
        padded_height, padded_width = mask.shape

        if foreground.size > 0 and rng.random() < self.foreground_crop_p:
            row, col = np.divmod(foreground[rng.integers(foreground.size)], width)
            top = int(np.clip(row + pad_top - size // 2, 0, padded_height - size))
            left = int(np.clip(col + pad_left - size // 2, 0, padded_width - size))
        else:
            top = int(rng.integers(0, padded_height - size + 1))
            left = int(rng.integers(0, padded_width - size + 1))
        return image[top : top + size, left : left + size], mask[top : top + size, left : left + size]
