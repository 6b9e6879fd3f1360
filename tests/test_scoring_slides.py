"""Slide readers: plain images, tifffile pyramids, OpenSlide SVS, remote range reads, bad files."""

import io
import json
import shutil
import struct
import zlib

import boto3
import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image

from cervi_ray.scoring.outputs import slide_summary, tile_table
from cervi_ray.scoring.slides import (
    MAX_PLAIN_PIXELS,
    OpenSlideSlide,
    PlainImageSlide,
    SlideError,
    SlideStorage,
    TiffFileSlide,
    open_slide,
)
from cervi_ray.scoring.stages import HEADER_INDEX, StageSettings, plan_slide, read_tiles, summarise_tiles
from cervi_ray.scoring.tissue import read_thumbnail


def write_pyramid(path, level0: np.ndarray, mpp: float, levels: int = 3, tile: int = 128) -> list[np.ndarray]:
    """Write a tiled, zlib-compressed TIFF pyramid (SubIFDs), each level half the previous one."""
    images = [level0]
    for _ in range(levels - 1):
        previous = images[-1]
        size = (previous.shape[1] // 2, previous.shape[0] // 2)
        images.append(cv2.resize(previous, size, interpolation=cv2.INTER_AREA))
    pixels_per_cm = 1e4 / mpp
    with tifffile.TiffWriter(path) as writer:
        writer.write(
            images[0], tile=(tile, tile), compression="zlib", photometric="rgb", subifds=levels - 1,
            resolution=(pixels_per_cm, pixels_per_cm), resolutionunit="CENTIMETER",
        )
        for image in images[1:]:
            writer.write(image, tile=(tile, tile), compression="zlib", photometric="rgb", subfiletype=1)
    return images


@pytest.fixture(scope="module")
def kidney(data_root) -> np.ndarray:
    return tifffile.imread(data_root / "wsi" / "kidney-48-5.tif")  # (901, 1493, 3)


def test_plain_png_is_single_level(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (37, 53), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "gray.png")
    slide = open_slide(str(tmp_path / "gray.png"))
    assert isinstance(slide, PlainImageSlide)
    assert slide.dimensions == (53, 37)
    assert len(slide.levels) == 1
    region = slide.read(0, 5, 7, 10, 4)
    # Grayscale comes back as RGB with the channel repeated.
    assert region.shape == (4, 10, 3)
    assert np.array_equal(region[..., 0], pixels[7:11, 5:15])
    assert np.array_equal(region[..., 2], pixels[7:11, 5:15])


def test_plain_tiff_through_tifffile(data_root, kidney):
    slide = open_slide(str(data_root / "wsi" / "kidney-48-5.tif"))
    assert isinstance(slide, TiffFileSlide)
    assert slide.dimensions == (1493, 901)
    # Its resolution tags are 1 x 1 without a unit, so it has no pixel size.
    assert slide.mpp is None
    assert np.array_equal(slide.read(0, 100, 200, 64, 32), kidney[200:232, 100:164])


def test_pyramid_levels_and_resolution(tmp_path, kidney):
    images = write_pyramid(tmp_path / "kidney.tif", kidney, mpp=0.25)
    slide = open_slide(str(tmp_path / "kidney.tif"))
    assert isinstance(slide, TiffFileSlide)
    assert [(level.width, level.height) for level in slide.levels] == [(1493, 901), (746, 450), (373, 225)]
    assert slide.mpp == pytest.approx(0.25)
    for index, image in enumerate(images):
        assert np.array_equal(slide.read(index, 10, 20, 200, 150), image[20:170, 10:210])


def test_region_read_decodes_only_its_tiles(tmp_path, kidney):
    write_pyramid(tmp_path / "kidney.tif", kidney, mpp=0.25, tile=128)
    slide = open_slide(str(tmp_path / "kidney.tif"))
    slide.read(0, 130, 130, 100, 100)  # inside tile (1, 1) of 128-pixel tiles
    assert list(slide._segments) == [(0, 1 * 12 + 1)]  # 12 tiles across 1493 pixels


def test_pyramid_tiles_read_at_matching_level(tmp_path, kidney):
    # Slide at 0.25 microns per pixel, model at 1.0: the 4x level fits exactly, no resampling.
    images = write_pyramid(tmp_path / "kidney.tif", kidney, mpp=0.25)
    settings = StageSettings(
        tile_size=64, overlap=0, min_tissue_fraction=0.0, model_mpp=1.0, slide_mpp=None, thumbnail_size=256,
        storage=SlideStorage(), views=1, has_cytoplasm=True, write_masks=False,
    )
    rows = plan_slide({"slide_id": "kidney", "uri": str(tmp_path / "kidney.tif")}, settings)
    tiles = [row for row in rows if row["tile_index"] != HEADER_INDEX]
    assert tiles, "the kidney image has foreground, so some tiles must be kept"
    assert {row["level"] for row in tiles} == {2}
    batch = {key: np.asarray([row[key] for row in tiles], dtype=object if key in ("uri", "error", "slide_id") else None)
             for key in tiles[0] if key != "thumbnail"}
    read = read_tiles(batch, settings)
    level2 = images[2]
    for i, row in enumerate(tiles):
        x, y = row["read_x0"], row["read_y0"]
        width, height = row["valid_width"], row["valid_height"]
        assert np.array_equal(read["image"][i][:height, :width], level2[y : y + height, x : x + width])
        assert read["error"][i] == ""


def test_svs_through_openslide(data_root):
    slide = open_slide(str(data_root / "wsi" / "cmu-1-small-region.svs"))
    assert isinstance(slide, OpenSlideSlide)
    assert slide.dimensions == (2220, 2967)
    assert slide.mpp == pytest.approx(0.499)
    assert slide.objective_power == 20
    assert slide.read(0, 1000, 1000, 32, 16).shape == (16, 32, 3)


def test_thumbnail_bounded(data_root):
    slide = open_slide(str(data_root / "wsi" / "cmu-1-small-region.svs"))
    thumbnail = read_thumbnail(slide, 300)
    # 2220 x 2967 scaled so the longer side is 300.
    assert thumbnail.shape == (300, 224, 3)
    assert thumbnail.dtype == np.uint8


def _png_with_size(width: int, height: int) -> bytes:
    """A 1 x 1 PNG whose header declares width x height instead."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR width and height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR checksum
    return bytes(data)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("empty.svs", b""),
        ("empty.png", b""),
        ("text.tif", b"this is not an image\n" * 10),
        ("text.jpg", b"<html>not a jpeg</html>"),
        ("huge.png", _png_with_size(100_000, 100_000)),
    ],
)
def test_bad_files_raise_slide_error(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(SlideError, match=name):
        open_slide(str(tmp_path / name))


def test_huge_plain_image_named_in_error(tmp_path):
    # 12000 x 12000 is above our limit but below PIL's own decompression-bomb limit.
    (tmp_path / "huge.png").write_bytes(_png_with_size(12_000, 12_000))
    with pytest.raises(SlideError, match=f"exceeds the {MAX_PLAIN_PIXELS} pixels"):
        open_slide(str(tmp_path / "huge.png"))


def test_truncated_png_fails(data_root, tmp_path):
    data = (data_root / "isbi2014" / "edf_real" / "EDF000.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideError, match="cut.png"):
        open_slide(str(tmp_path / "cut.png"))


def test_truncated_tiff_tile_fails_on_read(tmp_path, kidney):
    write_pyramid(tmp_path / "kidney.tif", kidney, mpp=0.25, levels=1)
    data = (tmp_path / "kidney.tif").read_bytes()
    # Keep the header and the first two thirds of the tiles. The directory at the end is lost
    # too, so the reader must fail at open or at read, naming the slide.
    (tmp_path / "cut.tif").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(SlideError, match="cut.tif"):
        slide = open_slide(str(tmp_path / "cut.tif"))
        slide.read(0, 1300, 800, 100, 100)


def test_unknown_extension(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SlideError, match="not a slide type"):
        open_slide(str(tmp_path / "notes.txt"))


def test_remote_tiff_range_reads(s3_server, tmp_path, kidney, data_root):
    write_pyramid(tmp_path / "kidney.tif", kidney, mpp=0.25)
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket="slides")
    client.upload_file(str(tmp_path / "kidney.tif"), "slides", "batch/kidney.tif")
    client.upload_file(str(data_root / "wsi" / "cmu-1-small-region.svs"), "slides", "batch/cmu.svs")
    cache = tmp_path / "cache"
    storage = SlideStorage(endpoint_url=s3_server, cache_dir=str(cache))

    remote = open_slide("s3://slides/batch/kidney.tif", storage)
    local = open_slide(str(tmp_path / "kidney.tif"))
    assert isinstance(remote, TiffFileSlide)
    assert np.array_equal(remote.read(1, 40, 30, 300, 200), local.read(1, 40, 30, 300, 200))
    # Range reads: nothing was downloaded.
    assert not cache.exists()

    # SVS needs OpenSlide, which reads local files: it is downloaded once to the cache.
    svs = open_slide("s3://slides/batch/cmu.svs", storage)
    assert isinstance(svs, OpenSlideSlide)
    assert len(list(cache.rglob("cmu.svs"))) == 1
    shutil.rmtree(cache)


def test_corrupt_tile_makes_slide_partial(tmp_path, kidney):
    write_pyramid(tmp_path / "kidney.tif", kidney, mpp=0.25, tile=128)
    # The darkest 128-pixel tile of level 0 away from the right border, where grid and TIFF tiles align.
    means = [(kidney[row * 128 : row * 128 + 128, col * 128 : col * 128 + 128].mean(), row * 12 + col)
             for row in range(7) for col in range(11)]
    corrupt = min(means)[1]
    with tifffile.TiffFile(tmp_path / "kidney.tif") as tif:
        page = tif.pages[0]
        offset, count = page.dataoffsets[corrupt], page.databytecounts[corrupt]
    data = bytearray((tmp_path / "kidney.tif").read_bytes())
    data[offset : offset + count] = b"\xff" * count
    (tmp_path / "kidney.tif").write_bytes(bytes(data))

    # Model at the slide's resolution: tiles come from level 0, the thumbnail from an intact level.
    settings = StageSettings(
        tile_size=128, overlap=0, min_tissue_fraction=0.0, model_mpp=0.25, slide_mpp=None, thumbnail_size=256,
        storage=SlideStorage(), views=1, has_cytoplasm=True, write_masks=False,
    )
    rows = plan_slide({"slide_id": "kidney", "uri": str(tmp_path / "kidney.tif")}, settings)
    tiles = [row for row in rows if row["tile_index"] != HEADER_INDEX]
    batch = {key: np.asarray([row[key] for row in tiles], dtype=object if key in ("uri", "error", "slide_id") else None)
             for key in tiles[0] if key != "thumbnail"}
    errors = read_tiles(batch, settings)["error"]
    failed = {row["tile_index"] for row, error in zip(tiles, errors) if error}
    # Only the grid tile over the corrupt TIFF tile fails, and its error names the read.
    assert failed == {corrupt}
    assert errors[[row["tile_index"] for row in tiles].index(corrupt)].startswith("read failed:")

    # Statistics mark that tile failed, and the slide's summary is partial.
    count = len(tiles)
    read = read_tiles(batch, settings)
    read["labels"] = np.zeros((count, 128, 128), dtype=np.uint8)
    read["disagreement_votes"] = np.zeros((count, 128, 128), dtype=np.uint8)
    read["thumbnail"] = np.asarray([b""] * count, dtype=object)
    stage_rows = summarise_tiles(read, settings)
    tiles_file = tile_table(stage_rows, "m", "v")
    summary = slide_summary("kidney", "u", json.loads(rows[0]["slide_info"]), tiles_file, 5, "m", "v").to_pylist()[0]
    assert summary["status"] == "partial"
    assert summary["tiles_failed"] == 1
    assert summary["tiles_scored"] == count - 1
