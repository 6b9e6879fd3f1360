"""Reader for SIPaKMeD: Pap smear cluster images with per-cell nucleus and cytoplasm contours.

Sources:
- The official page https://www.cs.uoi.gr/~marina/sipakmed.html: 4,049 isolated cells cropped
  from 966 cluster images, in five categories (superficial-intermediate, parabasal,
  koilocytotic, dyskeratotic, metaplastic). Cite Plissiti et al., "SIPaKMeD: A new dataset
  for feature and image based classification of normal and pathological cervical cells in
  Pap smear images", ICIP 2018.
- The file layout comes from public third-party loaders, not from the authors: one archive
  per class unpacks to im_<Class>/ (im_Superficial-Intermediate, im_Parabasal,
  im_Koilocytotic, im_Dyskeratotic, im_Metaplastic), sometimes nested once more as
  im_<Class>/im_<Class>/. It contains the cluster images NNN.bmp with one pair of contours per
  cell, NNN_cytKK.dat (cell boundary) and NNN_nucKK.dat (its nucleus), and a CROPPED/
  folder of single-cell crops, which this reader ignores. Those loaders read each .dat line
  as "x,y" with float coordinates.

Each sample is one cluster image, so all cells of a cluster image share its group. The
cytoplasm label is the union of the cell polygons minus every nucleus, and each cell instance
is its cell polygon joined with its nucleus polygon.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from skimage.draw import polygon as fill_polygon

from cervi_ray.data.readers_isbi import semantic_mask
from cervi_ray.data.readers_public import LabelledRecord, class_folders, label_instances, sample_meta
from cervi_ray.data.sample import Sample, load_image, read_image_size

logger = logging.getLogger(__name__)

KIND = "sipakmed"
LAYOUT = (
    "one folder per class, im_<Class>/ or im_<Class>/im_<Class>/, holding cluster images NNN.bmp "
    "and per cell the contours NNN_cytKK.dat and NNN_nucKK.dat"
)
CLASS_NAMES = ("Superficial-Intermediate", "Parabasal", "Koilocytotic", "Dyskeratotic", "Metaplastic")
CLASS_FOLDERS = tuple(f"im_{name}" for name in CLASS_NAMES)

_CONTOUR_NAME = re.compile(r"(?P<stem>.+)_(?P<part>cyt|nuc)(?P<index>\d+)\.dat", re.IGNORECASE)
_FIELD_SEPARATORS = re.compile(r"[,;\s]+")
_PARTS = ("cyt", "nuc")

# {image stem (lower case): {cell index: {"cyt" | "nuc": .dat path}}}
ContourFiles = dict[str, dict[int, dict[str, Path]]]


# Contour files.


def _malformed(path: Path, line_number: int, line: str, problem: str) -> ValueError:
    return ValueError(
        f"Contour {path} line {line_number} {problem}, got {line.strip()!r}. Each line must be one x,y "
        f"point: two numbers separated by a comma, semicolon or whitespace. Fix or remove the line."
    )


def read_contour(path: str | Path) -> np.ndarray:
    """Read a .dat contour as (K, 2) float64 (x, y) points, x the column and y the row.

    Blank lines are skipped, and so are lines before the first point that are not two numbers
    (a header). After the first point every line must be a finite x,y pair, and a contour needs
    at least 3 points.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Contour {path} not found: check the data path.")
    text = path.read_text(encoding="utf-8", errors="replace")

    points: list[tuple[float, float]] = []
    header_lines = 0
    for line_number, line in enumerate(text.splitlines(), start=1):
        fields = [field for field in _FIELD_SEPARATORS.split(line.strip()) if field]
        if not fields:
            continue
        try:
            values = [float(field) for field in fields]
        except ValueError:
            values = []
        if len(values) != 2:
            if not points:
                header_lines += 1
                continue
            raise _malformed(path, line_number, line, "is not two numbers")
        if not all(math.isfinite(value) for value in values):
            raise _malformed(path, line_number, line, "has a coordinate that is not finite")
        points.append((values[0], values[1]))

    if header_lines:
        logger.debug("Skipped %d header lines in %s", header_lines, path)
    if len(points) < 3:
        raise ValueError(
            f"Contour {path} must contain at least 3 x,y points to enclose an area, got {len(points)}. "
            f"Check that the file is a SIPaKMeD contour and is complete."
        )
    return np.asarray(points, dtype=np.float64)


def rasterise_contour(points: np.ndarray, shape: tuple[int, int], path: str | Path) -> np.ndarray:
    """Fill a closed (K, 2) x, y polygon into an (H, W) bool mask, raising if it covers no pixel."""
    mask = np.zeros(shape, dtype=bool)
    rows, cols = fill_polygon(points[:, 1], points[:, 0], shape=shape)
    mask[rows, cols] = True
    if not mask.any():
        raise ValueError(
            f"Contour {path} covers no pixel of its {shape[0]} x {shape[1]} (H x W) image. Its points "
            f"lie outside the image or enclose no area: check that it belongs to this image."
        )
    return mask


def _contours_by_stem(folder: Path) -> ContourFiles:
    contours: ContourFiles = {}
    for path in sorted(folder.iterdir()):
        match = _CONTOUR_NAME.fullmatch(path.name)
        if match is None or not path.is_file():
            continue
        stem, part, index = match.group("stem").lower(), match.group("part").lower(), int(match.group("index"))
        cell = contours.setdefault(stem, {}).setdefault(index, {})
        if part in cell:
            raise ValueError(
                f"Contours {cell[part]} and {path} both claim cell {index} of image {match.group('stem')}. "
                f"Keep one of them."
            )
        cell[part] = path
    return contours


def _partner_path(path: Path, part: str) -> Path:
    """Return the contour path of the other part of the same cell: 001_cyt02.dat -> 001_nuc02.dat."""
    match = _CONTOUR_NAME.fullmatch(path.name)
    return path.with_name(f"{match.group('stem')}_{part}{match.group('index')}.dat")


def _cell_pairs(contours: ContourFiles, folder: Path, image_path: Path) -> list[tuple[Path, Path]]:
    """Return the (cytoplasm, nucleus) contour pairs of one image in cell order."""
    cells = contours.get(image_path.stem.lower())
    if not cells:
        raise FileNotFoundError(
            f"Contours for image {image_path} not found: expected {folder / image_path.stem}_cyt01.dat and "
            f"{image_path.stem}_nuc01.dat, one pair per cell. A {KIND} source must contain {LAYOUT}."
        )
    pairs = []
    for index in sorted(cells):
        files = cells[index]
        for part in _PARTS:
            if part not in files:
                other = files[_PARTS[1 - _PARTS.index(part)]]
                missing = _partner_path(other, part)
                raise FileNotFoundError(
                    f"Contour {missing} for cell {index} of image {image_path} not found, but {other.name} "
                    f"exists. Every cell needs both NNN_cytKK.dat and NNN_nucKK.dat: add the file or remove "
                    f"{other.name}."
                )
        pairs.append((files["cyt"], files["nuc"]))
    return pairs


# Listing.


def _image_folder(class_folder: Path) -> Path:
    # Some copies unpack each class archive into a folder of the same name.
    nested = class_folder / class_folder.name
    return nested if nested.is_dir() else class_folder


def class_label(class_folder_name: str) -> str:
    """Return the class name of a class folder: "im_Parabasal" gives "Parabasal"."""
    return class_folder_name.removeprefix("im_")


def _list_class_folder(class_folder: Path) -> list[LabelledRecord]:
    folder = _image_folder(class_folder)
    contours = _contours_by_stem(folder)
    images = sorted(path for path in folder.iterdir() if path.is_file() and path.suffix.lower() == ".bmp")

    records = []
    for image_path in images:
        _cell_pairs(contours, folder, image_path)  # raises for missing contours
        height, width = read_image_size(image_path)
        stem = f"{class_folder.name}/{image_path.stem}"
        records.append(
            LabelledRecord(
                stem=stem,
                image_path=image_path,
                mask_path=folder,  # the folder of the image's .dat contours
                height=height,
                width=width,
                group=stem,  # the cluster image: all its cells stay in one split
                label_class=class_label(class_folder.name),
            )
        )

    orphans = sorted(set(contours) - {path.stem.lower() for path in images})
    if orphans:
        logger.warning(
            "Ignored contours of %d images in %s without a .bmp image, e.g. %s", len(orphans), folder, orphans[:3]
        )
    return records


def list_sipakmed(path: Path) -> list[LabelledRecord]:
    """List the cluster images of every class folder with their contour folder as mask_path."""
    path = Path(path)
    records = []
    for class_folder in class_folders(path, KIND, LAYOUT):
        class_records = _list_class_folder(class_folder)
        if not class_records:
            logger.warning("Class folder %s contains no .bmp cluster images, so it is skipped", class_folder)
        records += class_records
    return records


# Loading.


def load_sipakmed(row: Mapping[str, Any]) -> Sample:
    """Load one cluster image and rasterise the contours of its cells."""
    image_path = Path(row["image_path"])
    folder = Path(row["mask_path"])
    pairs = _cell_pairs(_contours_by_stem(folder), folder, image_path)

    image = load_image(image_path)
    shape = image.shape[:2]
    cells = []
    nuclei = []
    for cytoplasm_path, nucleus_path in pairs:
        nucleus = rasterise_contour(read_contour(nucleus_path), shape, nucleus_path)
        cell = rasterise_contour(read_contour(cytoplasm_path), shape, cytoplasm_path)
        cells.append(cell | nucleus)  # a nucleus drawn slightly past its cell boundary stays in the cell
        nuclei.append(nucleus)
    cell_instances = np.stack(cells)  # N x (H, W) -> (N, H, W)
    nucleus_masks = np.stack(nuclei)

    return Sample(
        id=str(row["id"]),
        image=image,
        mask=semantic_mask(cell_instances, nucleus_masks.any(axis=0)),
        annotation="full",
        cell_instances=cell_instances,
        nucleus_instances=label_instances(nucleus_masks),
        meta=sample_meta(row),
    )
