"""A corpus of bad inputs: the damaged, mislabelled and hostile files that reach cervi_ray.

Each writer puts its items into a folder and returns their paths by name. The files are tiny,
so writing the whole corpus takes milliseconds. tests/test_bad_inputs.py drives every item
through the product and checks the error or the recorded failure.
"""

import io
import json
import shutil
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image

IMAGE_SIZE = (40, 50)  # (H, W) of every good image and mask of a folder source
# Declared by the PNG bomb's header: 4 * 10**10 pixels, 120 GB as RGB, in a file of 60 bytes.
BOMB_SIDE = 200_000
# Where the shared data keeps the small Aperio slide that the truncated copy is cut from.
SVS_RELATIVE_PATH = Path("wsi") / "cmu-1-small-region.svs"


# Payloads that must never run.


def record_payload(marker: str) -> None:
    """Write `marker`: the visible effect of a pickle or YAML payload that was executed."""
    Path(marker).write_text("payload ran\n")


class PicklePayload:
    """An object whose unpickling calls record_payload, as a malicious checkpoint would."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (record_payload, (self.marker,))


def write_pickle_payload(path: Path, marker: Path) -> Path:
    """Write a torch.save file whose optimizer entry runs record_payload(marker) when unpickled."""
    torch.save({"optimizer": PicklePayload(marker)}, path)
    return path


# Images.


def encode_image(array: np.ndarray, image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=image_format)
    return buffer.getvalue()


def good_image(seed: int = 0, size: tuple[int, int] = IMAGE_SIZE) -> np.ndarray:
    """A (H, W, 3) uint8 image of grey noise."""
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def good_mask(size: tuple[int, int] = IMAGE_SIZE) -> np.ndarray:
    """A (H, W) uint8 mask with three bands: background 0, cytoplasm 1, nucleus 2."""
    mask = np.zeros(size, dtype=np.uint8)
    mask[size[0] // 3 :] = 1
    mask[2 * size[0] // 3 :] = 2
    return mask


def png_bomb(width: int = BOMB_SIDE, height: int = BOMB_SIDE) -> bytes:
    """A PNG whose IHDR declares width x height RGB pixels (valid CRC), with a few bytes of data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def zip_archive() -> bytes:
    """The bytes of a small zip archive holding one text file."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("readme.txt", "a zip archive saved with an image extension")
    return buffer.getvalue()


def write_broken_images(folder: Path) -> dict[str, Path]:
    """Write damaged image files of IMAGE_SIZE's declared size; return {name: path}.

    Header intact, pixels unreadable: truncated.png/.tif/.bmp (first half of the file),
    corrupted.png (64 bytes of compressed data inverted) and corrupted.bmp (pixel offset past
    the end). Header unreadable: corrupted.tif (first IFD offset past the end), empty.png/.tif/
    .bmp (zero bytes), notes.png (text), archive.tif (a zip file) and bomb.png (a PNG header
    declaring BOMB_SIDE x BOMB_SIDE pixels).
    """
    folder.mkdir(parents=True, exist_ok=True)
    image = good_image(seed=1)
    written = {}

    def put(name: str, data: bytes) -> None:
        written[name] = folder / name
        written[name].write_bytes(data)

    for image_format, extension in (("PNG", "png"), ("TIFF", "tif"), ("BMP", "bmp")):
        data = encode_image(image, image_format)
        put(f"truncated.{extension}", data[: len(data) // 2])
        put(f"empty.{extension}", b"")

    png = bytearray(encode_image(image, "PNG"))
    middle = len(png) // 2
    png[middle : middle + 64] = bytes(value ^ 0xFF for value in png[middle : middle + 64])
    put("corrupted.png", bytes(png))

    tiff = bytearray(encode_image(image, "TIFF"))
    tiff[4:8] = struct.pack("<I", 0x7FFFFF00)  # little-endian offset of the first IFD
    put("corrupted.tif", bytes(tiff))

    bmp = bytearray(encode_image(image, "BMP"))
    bmp[10:14] = struct.pack("<I", 10**8)  # offset of the pixel array
    put("corrupted.bmp", bytes(bmp))

    put("notes.png", b"Slide notes: these are not pixels.\n" * 20)
    put("archive.tif", zip_archive())
    put("bomb.png", png_bomb())
    return written


def write_float_tiffs(folder: Path, size: tuple[int, int] = IMAGE_SIZE) -> dict[str, Path]:
    """Write float32 TIFFs containing NaN and inf: grey (H, W) and RGB (H, W, 3); return {name: path}.

    The grey one otherwise contains label values 0, 1 and 2, so only the non-finite pixels are wrong.
    """
    folder.mkdir(parents=True, exist_ok=True)
    grey = good_mask(size).astype(np.float32)
    grey[0, :5] = np.nan
    grey[1, :5] = np.inf
    grey[2, :5] = -np.inf
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    paths = {"nan_grey.tif": folder / "nan_grey.tif", "nan_rgb.tif": folder / "nan_rgb.tif"}
    tifffile.imwrite(paths["nan_grey.tif"], grey)
    tifffile.imwrite(paths["nan_rgb.tif"], rgb, photometric="rgb")
    return paths


def write_truncated_svs(folder: Path, data_root: Path) -> Path:
    """Copy the small Aperio SVS of the shared data into `folder` and keep its first half."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "truncated.svs"
    shutil.copyfile(data_root / SVS_RELATIVE_PATH, target)
    with open(target, "r+b") as stream:
        stream.truncate(target.stat().st_size // 2)
    return target


# Folder sources: images/<stem>.png with masks/<stem>.png.


def write_folder_source(root: Path, stems: tuple[str, ...] = ("a", "b", "c", "d", "e", "f")) -> Path:
    """Write a valid folder source of IMAGE_SIZE images with three-label masks; return `root`."""
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for index, stem in enumerate(stems):
        Image.fromarray(good_image(seed=index)).save(root / "images" / f"{stem}.png")
        Image.fromarray(good_mask()).save(root / "masks" / f"{stem}.png")
    return root


MASK_MISMATCHES = ("wrong_size", "unknown_labels")


def write_mask_mismatch(root: Path, stem: str) -> Path:
    """Add image `stem` whose mask does not fit it to a folder source; return the mask's path.

    wrong_size: the mask is one row taller than its image. unknown_labels: the mask contains 7 and
    255 next to the labels 0 and 1.
    """
    height, width = IMAGE_SIZE
    if stem == "wrong_size":
        mask = np.zeros((height + 1, width), dtype=np.uint8)
    elif stem == "unknown_labels":
        mask = good_mask()
        mask[mask == 2] = 255
        mask[0, 0] = 7
    else:
        raise ValueError(f"stem must be one of {MASK_MISMATCHES}, got {stem!r}")
    Image.fromarray(good_image(seed=9)).save(root / "images" / f"{stem}.png")
    path = root / "masks" / f"{stem}.png"
    Image.fromarray(mask).save(path)
    return path


# Configs.


def folder_config_text(source_path: Path) -> str:
    """A valid config with one folder source at `source_path`, for editing into bad ones."""
    return (
        "data:\n"
        f"  sources: [{{name: mine, kind: folder, path: {source_path}}}]\n"
        "  crop_size: 32\n"
        "run:\n"
        "  name: corpus\n"
    )


def write_bad_configs(folder: Path, source_path: Path, marker: Path) -> dict[str, Path]:
    """Write config files that load_config must reject; return {name: path}.

    The python_tag config names record_payload(marker) in a YAML tag that only an unsafe YAML
    loader would execute.
    """
    folder.mkdir(parents=True, exist_ok=True)
    valid = folder_config_text(source_path)
    texts = {
        "empty.yaml": "",
        "missing_data.yaml": "run:\n  name: corpus\n",
        "source_without_kind.yaml": f"data:\n  sources: [{{name: mine, path: {source_path}}}]\n",
        "wrong_type.yaml": valid + "teacher_train:\n  epochs: many\n",
        "list_for_number.yaml": valid + "scaling:\n  num_workers: [2]\n",
        "unknown_key.yaml": valid + "teacher_train:\n  epoch: 3\n",
        "unknown_section.yaml": valid + "trainer:\n  epochs: 3\n",
        "not_a_mapping.yaml": "- data\n- run\n",
        "python_tag.yaml": (
            f"data: !!python/object/apply:bad_inputs.record_payload [{json.dumps(str(marker))}]\n"
        ),
    }
    paths = {}
    for name, text in texts.items():
        paths[name] = folder / name
        paths[name].write_text(text)
    return paths


# Splits files.


def write_bad_splits(folder: Path) -> dict[str, Path]:
    """Write splits files that read_splits must reject; return {name: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    texts = {
        "zero_bytes.json": "",
        "invalid_json.json": '{"version": 1, "test": [',
        "a_list.json": "[1, 2, 3]\n",
        "missing_keys.json": json.dumps({"version": 1, "test": []}),
        "test_not_a_list.json": json.dumps({
            "version": 1, "seed": 0, "test_fraction": 0.2, "folds_count": 2,
            "test": "mine/a", "folds": [{"train": [], "val": []}, {"train": [], "val": []}],
        }),
    }
    paths = {}
    for name, text in texts.items():
        paths[name] = folder / name
        paths[name].write_text(text)
    return paths


# Scoring.


def cell_slide(size: tuple[int, int] = (128, 128), seed: int = 0) -> np.ndarray:
    """A (H, W, 3) uint8 slide image: dark round cells on a white background."""
    rng = np.random.default_rng(seed)
    height, width = size
    rows, cols = np.mgrid[:height, :width]
    image = np.full((height, width), 240, dtype=np.uint8)
    for _ in range(6):
        row, col = int(rng.integers(12, height - 12)), int(rng.integers(12, width - 12))
        distance = np.hypot(rows - row, cols - col)
        image[distance < 10] = 150  # cytoplasm grey
        image[distance < 4] = 40  # nucleus dark
    return np.repeat(image[:, :, None], 3, axis=2)


def write_good_slides(folder: Path, names: tuple[str, ...]) -> dict[str, Path]:
    """Write one cell_slide PNG per name; return {name: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for seed, name in enumerate(names):
        paths[name] = folder / name
        Image.fromarray(cell_slide(seed=seed)).save(paths[name])
    return paths


def write_bad_slides(folder: Path, data_root: Path) -> dict[str, Path]:
    """Write slides that cannot be scored; return {name: path}.

    A truncated SVS, a zero-byte SVS, a truncated PNG (cut.png), text saved as .tif, a zip saved as .png,
    the PNG bomb and float TIFFs holding NaN and inf (write_float_tiffs).
    """
    folder.mkdir(parents=True, exist_ok=True)
    png = encode_image(cell_slide(seed=99), "PNG")
    contents = {
        "empty.svs": b"",
        "cut.png": png[: len(png) // 2],
        "text.tif": b"scanner log, not a slide\n" * 20,
        "archive.png": zip_archive(),
        "bomb.png": png_bomb(),
    }
    paths = {"truncated.svs": write_truncated_svs(folder, data_root)}
    for name, data in contents.items():
        paths[name] = folder / name
        paths[name].write_bytes(data)
    paths.update(write_float_tiffs(folder, size=(128, 128)))
    return paths


def write_scoring_manifest(path: Path, entries: list[tuple[str, str]]) -> Path:
    """Write a scoring manifest CSV with the columns path and slide_id, one row per entry."""
    lines = ["path,slide_id"] + [f"{slide_path},{slide_id}" for slide_path, slide_id in entries]
    path.write_text("\n".join(lines) + "\n")
    return path
