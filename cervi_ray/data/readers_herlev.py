"""Reader for the DTU/Herlev Pap smear database (the "New Pap-smear Database" of 2005).

Layout, as described by its authors and its download page:
- 917 single-cell colour images in 7 class folders, 3 normal and 4 abnormal (Jantzen, Norup,
  Dounias, Bjerregaard, "Pap-smear Benchmark Data For Pattern Classification", NiSIS 2005).
- The archive smear2005.zip from https://mde-lab.aegean.gr/index.php/downloads/ unpacks to
  "New database pictures/<class>/" with the folders normal_superficiel (sic),
  normal_intermediate, normal_columnar, light_dysplastic, moderate_dysplastic,
  severe_dysplastic and carcinoma_in_situ. Each cell is NAME.BMP with its segmentation
  NAME-d.bmp, which colour-codes nucleus, cytoplasm and background. This layout is quoted in
  the README and generator/ImageMaskDatasetGenerator.py of the public repository
  sarah-antillia/Image-Segmentation-Pap-Smear.

Point a source at the folder that contains the class folders. The class folder name becomes
label_class, and every image is its own group because no source documents which cells come
from the same slide.

NOTE: the sources above do not state the RGB values of the segmentation colours. Third-party
code only hints at them: ImageMaskDatasetGenerator.py (above) builds its masks from the pixels
whose blue channel is 255, and another Herlev U-Net script thresholds the blue channel at 128.
DEFAULT_COLOUR_MAP is an assumption that fits both if that blue region is the nucleus:
background red, cytoplasm dark blue (blue 128), nucleus blue (blue 255). A mask with other
colours fails with the list of colours found, and the source option colour_map sets the real
ones.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cervi_ray.data.labels import BACKGROUND, CLASS_NAMES, CYTOPLASM, NUCLEUS
from cervi_ray.data.readers_public import (
    LabelledRecord,
    class_folders,
    files_by_lower_name,
    label_components,
    reader_options,
    sample_meta,
)
from cervi_ray.data.sample import Sample, check_mask_size, load_image, read_image_size

logger = logging.getLogger(__name__)

KIND = "dtu_herlev"
LAYOUT = (
    "one folder per class (e.g. carcinoma_in_situ/) holding NAME.BMP cell images and their "
    "segmentations NAME-d.bmp"
)
CLASS_FOLDERS = (
    "normal_superficiel",
    "normal_intermediate",
    "normal_columnar",
    "light_dysplastic",
    "moderate_dysplastic",
    "severe_dysplastic",
    "carcinoma_in_situ",
)
MASK_SUFFIX = "-d.bmp"
# Assumed colours of the -d.bmp segmentations, see the NOTE in the module docstring.
DEFAULT_COLOUR_MAP = {"#ff0000": BACKGROUND, "#000080": CYTOPLASM, "#0000ff": NUCLEUS}

_HEX_COLOUR = re.compile(r"#?([0-9a-fA-F]{6})")
_MAX_LISTED_COLOURS = 10


# Colour maps.


def _colour_key(colour: Any) -> str:
    """Normalise "#RRGGBB", "RRGGBB", "R,G,B" or an (R, G, B) sequence to "#rrggbb"."""
    if isinstance(colour, str):
        text = colour.strip()
        hex_match = _HEX_COLOUR.fullmatch(text)
        if hex_match:
            return f"#{hex_match.group(1).lower()}"
        parts = [part.strip() for part in text.split(",")]
    elif isinstance(colour, (list, tuple)):
        parts = list(colour)
    else:
        parts = []

    try:
        channels = [int(part) for part in parts]
    except (TypeError, ValueError):
        channels = []
    if len(channels) != 3 or not all(0 <= channel <= 255 for channel in channels):
        raise ValueError(
            f"colour_map keys must be colours written '#RRGGBB' or 'R,G,B' with channels 0..255, "
            f"got {colour!r}. Quote '#RRGGBB' keys in YAML, where # starts a comment."
        )
    red, green, blue = channels
    return f"#{red:02x}{green:02x}{blue:02x}"


def parse_colour_map(colour_map: Mapping[Any, Any] | None) -> dict[str, int]:
    """Validate a map from mask colour to label. None gives DEFAULT_COLOUR_MAP.

    Keys are normalised to "#rrggbb", and labels must be 0, 1 or 2.
    """
    if colour_map is None:
        return dict(DEFAULT_COLOUR_MAP)
    if not isinstance(colour_map, Mapping) or not colour_map:
        raise ValueError(f"colour_map must be a non-empty mapping from colour to label, got {colour_map!r}")

    parsed: dict[str, int] = {}
    for colour, label in colour_map.items():
        key = _colour_key(colour)
        try:
            label_int = int(label)
        except (TypeError, ValueError) as e:
            raise ValueError(f"colour_map labels must be integers, got {colour!r}: {label!r}") from e
        if not 0 <= label_int < len(CLASS_NAMES):
            raise ValueError(
                f"colour_map labels must be in 0..{len(CLASS_NAMES) - 1} ({', '.join(CLASS_NAMES)}), "
                f"got {colour!r}: {label_int}"
            )
        if key in parsed and parsed[key] != label_int:
            raise ValueError(
                f"colour_map gives colour {key} two labels, {parsed[key]} and {label_int}. Keep one entry per colour."
            )
        parsed[key] = label_int
    return parsed


def resolve_options(colour_map: Mapping[Any, Any] | None) -> dict[str, Any]:
    """Return the reader options stored in the manifest: the colour map, defaults filled in."""
    parsed = parse_colour_map(colour_map)
    return {"colour_map": {key: parsed[key] for key in sorted(parsed)}}


def _rgb_codes(rgb: np.ndarray) -> np.ndarray:
    # (H, W, 3) uint8 -> (H, W) int64 codes 0xRRGGBB, so one np.unique finds the colours.
    channels = rgb.astype(np.int64)
    return (channels[..., 0] << 16) | (channels[..., 1] << 8) | channels[..., 2]


def colours_to_labels(rgb: np.ndarray, colour_map: Mapping[str, int], mask_path: str | Path) -> np.ndarray:
    """Map an (H, W, 3) colour mask to (H, W) uint8 labels, raising ValueError for unknown colours."""
    codes = _rgb_codes(rgb)
    values, inverse, counts = np.unique(codes, return_inverse=True, return_counts=True)
    names = [f"#{int(value):06x}" for value in values]

    unknown = [(name, int(count)) for name, count in zip(names, counts) if name not in colour_map]
    if unknown:
        unknown.sort(key=lambda item: -item[1])
        listed = ", ".join(f"{name} ({count} pixels)" for name, count in unknown[:_MAX_LISTED_COLOURS])
        more = f" and {len(unknown) - _MAX_LISTED_COLOURS} more" if len(unknown) > _MAX_LISTED_COLOURS else ""
        raise ValueError(
            f"Mask {mask_path} contains colours not in the colour map: {listed}{more} "
            f"(colour map {dict(colour_map)}). Set colour_map in the source config to map every "
            f"colour to a label (0 background, 1 cytoplasm, 2 nucleus), or fix the mask."
        )

    label_of_value = np.array([colour_map[name] for name in names], dtype=np.uint8)
    return label_of_value[inverse].reshape(codes.shape)


# Listing.


def _mask_path_for(image_path: Path, files: Mapping[str, Path]) -> Path | None:
    return files.get(f"{image_path.stem}{MASK_SUFFIX}".lower())


def _is_mask(path: Path) -> bool:
    return path.name.lower().endswith(MASK_SUFFIX)


def _list_class_folder(folder: Path) -> list[LabelledRecord]:
    files = files_by_lower_name(folder)
    images = sorted(path for path in files.values() if path.suffix.lower() == ".bmp" and not _is_mask(path))
    records = []
    for image_path in images:
        mask_path = _mask_path_for(image_path, files)
        if mask_path is None:
            raise FileNotFoundError(
                f"Segmentation {folder / (image_path.stem + MASK_SUFFIX)} for image {image_path} not found. "
                f"A {KIND} source must contain {LAYOUT}. Add the file or remove the image."
            )
        height, width = read_image_size(image_path)
        stem = f"{folder.name}/{image_path.stem}"
        records.append(
            LabelledRecord(
                stem=stem,
                image_path=image_path,
                mask_path=mask_path,
                height=height,
                width=width,
                group=stem,  # no documented slide or patient ids, so each cell is its own group
                label_class=folder.name,
            )
        )

    image_stems = {path.stem.lower() for path in images}
    orphans = sorted(
        path.name
        for path in files.values()
        if _is_mask(path) and path.name[: -len(MASK_SUFFIX)].lower() not in image_stems
    )
    if orphans:
        logger.warning("Ignored %d segmentations in %s without an image, e.g. %s", len(orphans), folder, orphans[:3])
    return records


def list_herlev(path: Path) -> list[LabelledRecord]:
    """List <class>/NAME.BMP with its segmentation <class>/NAME-d.bmp as mask_path."""
    path = Path(path)
    records = []
    for folder in class_folders(path, KIND, LAYOUT):
        class_records = _list_class_folder(folder)
        if not class_records:
            logger.warning("Class folder %s contains no .bmp images, so it is skipped", folder)
        records += class_records
    return records


# Loading.


def load_herlev(row: Mapping[str, Any]) -> Sample:
    """Load one Herlev cell: labels from the segmentation colours, one cell instance."""
    image_path = Path(row["image_path"])
    mask_path = Path(row["mask_path"])
    colour_map = parse_colour_map(reader_options(row).get("colour_map"))

    image = load_image(image_path)
    mask_rgb = load_image(mask_path)  # palette and grey BMPs become (H, W, 3) RGB
    check_mask_size(image, image_path, mask_rgb, mask_path)
    mask = colours_to_labels(mask_rgb, colour_map, mask_path)

    # One cell per image: the cell instance is everything that is not background.
    cell = mask != BACKGROUND
    cell_instances = cell[None] if cell.any() else np.zeros((0, *mask.shape), dtype=bool)  # (N, H, W), N <= 1
    return Sample(
        id=str(row["id"]),
        image=image,
        mask=mask,
        annotation="full",
        cell_instances=cell_instances,
        nucleus_instances=label_components(mask == NUCLEUS),
        meta=sample_meta(row),
    )
