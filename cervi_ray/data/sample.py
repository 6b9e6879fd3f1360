"""The in-memory form of one annotated image, and image reading shared by all readers."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile

from cervi_ray.data.labels import Annotation

logger = logging.getLogger(__name__)

# Errors PIL raises for files that are not images or whose data is damaged. Pillow 13 raises
# UnidentifiedImageError (an OSError) for unknown formats, OSError for truncated data and
# SyntaxError or ValueError for some broken chunks.
_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError)

# 16-bit grey levels are scaled to 8 bits by this factor (65535 / 255) so the full range maps
# onto 0..255 instead of being clipped at 255.
_UINT16_TO_UINT8 = 257.0


class _UnsupportedModeError(ValueError):
    """An image that decoded fine but whose pixel format has no defined 8-bit conversion."""


@dataclass
class Sample:
    """One image with its semantic mask and, where the data has them, instance masks.

    `mask` uses the labels of `cervi_ray.data.labels`. When `annotation` is "nucleus", only
    nuclei are annotated and label 0 means "not nucleus" (cytoplasm is never labelled).
    """

    id: str  # "<source>/<stem>", unique within a manifest, e.g. "isbi2015/frame004"
    image: np.ndarray  # (H, W, 3) uint8, grayscale input repeated to 3 channels
    mask: np.ndarray  # (H, W) uint8 semantic labels in {0, 1, 2}
    annotation: Annotation
    cell_instances: np.ndarray | None  # (N, H, W) bool whole-cell masks, may overlap
    nucleus_instances: np.ndarray | None  # (H, W) int32 label image, 0 = no nucleus
    meta: dict[str, Any] = field(default_factory=dict)  # source, kind, group, paths, ...


def _decompression_bomb_error(path: Path, error: Exception) -> ValueError:
    return ValueError(
        f"Image {path} has more pixels than PIL accepts "
        f"(PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}): {error}. The limit guards "
        f"against decompression bombs. If the file is trusted, raise "
        f"PIL.Image.MAX_IMAGE_PIXELS before loading it, or tile the image."
    )


def _unreadable_error(path: Path, file_role: str, error: Exception) -> ValueError:
    return ValueError(
        f"Cannot read {file_role} {path}: {error}. The file is empty, truncated, damaged or not an "
        f"image. Replace it with a complete image file or remove it from the data folder."
    )


def _check_is_file(path: Path, file_role: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{file_role.capitalize()} {path} not found: check the data path.")


def read_image_size(path: str | Path) -> tuple[int, int]:
    """Read (height, width) from the image header without decoding the pixels."""
    path = Path(path)
    _check_is_file(path, "image")
    try:
        with Image.open(path) as pil_image:
            width, height = pil_image.size
    except Image.DecompressionBombError as e:
        raise _decompression_bomb_error(path, e) from e
    except _READ_ERRORS as e:
        raise _unreadable_error(path, "image", e) from e
    return height, width


def _to_rgb_uint8(pil_image: Image.Image, path: Path) -> np.ndarray:
    """Convert a decoded PIL image to an (H, W, 3) uint8 array."""
    mode = pil_image.mode

    if mode in ("RGB", "L"):
        array = np.asarray(pil_image, dtype=np.uint8)
    elif mode == "1":
        array = np.asarray(pil_image.convert("L"), dtype=np.uint8)
    elif mode.startswith("I;16") or mode == "I":
        # PIL's convert("L") clips 16-bit values at 255, so scale the full 16-bit range instead.
        # NOTE: 32-bit "I" images are assumed to contain 16-bit data, so larger values are clipped.
        wide = np.clip(np.asarray(pil_image, dtype=np.float64), 0, 65535)
        array = np.round(wide / _UINT16_TO_UINT8).astype(np.uint8)
    elif mode == "F":
        raise _UnsupportedModeError(
            f"Image {path} has floating-point pixels (PIL mode 'F'), which have no standard "
            f"grey range. Save it as an 8-bit or 16-bit image."
        )
    else:
        # PIL converts RGBA, LA, P, CMYK, YCbCr and the other modes to RGB, dropping alpha.
        array = np.asarray(pil_image.convert("RGB"), dtype=np.uint8)

    if array.ndim == 2:
        # (H, W) -> (H, W, 3): models take 3 channels, so grey is repeated.
        array = np.repeat(array[:, :, None], 3, axis=2)
    return np.ascontiguousarray(array)


def load_image(path: str | Path) -> np.ndarray:
    """Load any PIL-readable image as an (H, W, 3) uint8 array.

    Grayscale is repeated to 3 channels, 16-bit grey is scaled to 8 bits, alpha is dropped.
    Raises FileNotFoundError for a missing file and ValueError for an empty, truncated,
    damaged or non-image file and for images above PIL's decompression-bomb limit.
    """
    path = Path(path)
    _check_is_file(path, "image")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        logger.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set, so truncated images load without error "
            "and their missing rows are filled in (reading %s)",
            path,
        )
    try:
        with Image.open(path) as pil_image:
            pil_image.load()
            return _to_rgb_uint8(pil_image, path)
    except _UnsupportedModeError:
        raise
    except Image.DecompressionBombError as e:
        raise _decompression_bomb_error(path, e) from e
    except _READ_ERRORS as e:
        raise _unreadable_error(path, "image", e) from e


def load_label_image(path: str | Path) -> np.ndarray:
    """Load a mask file as a 2-D array of its stored values, without rescaling.

    Mode "1" gives bool, "L" uint8, "I;16" uint16. An RGB mask whose channels are equal
    gives its first channel, and other colour masks raise ValueError.
    """
    path = Path(path)
    _check_is_file(path, "mask")
    try:
        with Image.open(path) as pil_image:
            pil_image.load()
            if pil_image.mode == "P":
                # Palette masks store the label in the palette index, so read the indices.
                array = np.asarray(pil_image)
            elif pil_image.mode in ("RGBA", "LA"):
                array = np.asarray(pil_image)[..., :-1]
            else:
                array = np.asarray(pil_image)
    except Image.DecompressionBombError as e:
        raise _decompression_bomb_error(path, e) from e
    except _READ_ERRORS as e:
        raise _unreadable_error(path, "mask", e) from e

    if array.ndim == 3:
        # (H, W, C) -> (H, W) when all channels carry the same value.
        if not all(np.array_equal(array[:, :, 0], array[:, :, c]) for c in range(1, array.shape[2])):
            raise ValueError(
                f"Mask {path} is a colour image with different values per channel. Save masks "
                f"as single-channel images of label values (for example 8-bit grayscale PNG)."
            )
        array = array[:, :, 0]
    return np.ascontiguousarray(array)


@dataclass(frozen=True)
class ImageRecord:
    """One image found by a reader's lister: paths and size, no pixels."""

    stem: str
    image_path: Path
    mask_path: Path  # a mask file, a folder of per-cell masks or a .mat file
    height: int
    width: int
    group: str  # images of one group always land in the same split
    mask_index: int = -1  # index into the arrays of a .mat file, -1 when unused


def check_mask_size(image: np.ndarray, image_path: str | Path, mask: np.ndarray, mask_path: str | Path) -> None:
    """Raise ValueError unless the mask has the image's height and width."""
    image_size = tuple(image.shape[:2])
    mask_size = tuple(mask.shape[:2])
    if image_size != mask_size:
        raise ValueError(
            f"Mask {mask_path} is {mask_size[0]} x {mask_size[1]} (H x W) but image {image_path} "
            f"is {image_size[0]} x {image_size[1]}. Each mask must have its image's size: "
            f"check that the files belong together."
        )


def check_binary_mask(mask: np.ndarray, path: str | Path) -> np.ndarray:
    """Return mask != 0 as bool after checking that it contains at most one nonzero value."""
    if mask.dtype == bool:
        return mask
    foreground = mask != 0
    stored = mask[foreground]
    if stored.size > 0 and np.any(stored != stored[0]):
        nonzero = np.unique(stored)  # sorting is slow, so only for the message
        listed = ", ".join(str(v) for v in nonzero[:8])
        raise ValueError(
            f"Mask {path} must be binary (0 and one other value), got the nonzero values "
            f"{listed}{' ...' if nonzero.size > 8 else ''}. Check that this is the right file."
        )
    return foreground
