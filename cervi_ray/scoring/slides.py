"""Slides behind one interface: OpenSlide formats, TIFF through tifffile, plain images through PIL.

A Slide exposes its pyramid levels, the resolution its metadata records and region reads in a
level's pixel coordinates. Readers by file type:
  - .svs .ndpi .mrxs .vms .vmu .scn .svslide .bif: OpenSlide. Remote ones are downloaded to a
    local cache first, because OpenSlide reads only local files.
  - .tif .tiff: tifffile, reading only the tiles or strips a region needs, also on remote files
    through fsspec range reads. When tifffile lacks the codec (JPEG and LZW need the optional
    imagecodecs package), the file goes to OpenSlide if it is a tiled TIFF, else to PIL.
  - .png .jpg .jpeg .bmp: PIL, decoded whole as a single-level slide, up to MAX_PLAIN_PIXELS.
Pixels come back as (H, W, 3) uint8 RGB; grayscale is repeated and transparency is composited
over white. Region reads must lie inside the level: read_window clips and pads.
"""

import hashlib
import io
import logging
import os
import re
import tempfile
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Literal

import cv2
import numpy as np
import openslide
import tifffile
from PIL import Image

logger = logging.getLogger(__name__)

OPENSLIDE_EXTENSIONS = (".svs", ".ndpi", ".mrxs", ".vms", ".vmu", ".scn", ".svslide", ".bif")
TIFF_EXTENSIONS = (".tif", ".tiff")
PLAIN_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
SLIDE_EXTENSIONS = OPENSLIDE_EXTENSIONS + TIFF_EXTENSIONS + PLAIN_EXTENSIONS
S3_SCHEME = "s3://"
BACKGROUND_VALUE = 255  # brightfield background is white; padding uses it
# Images decoded whole (plain images, untiled TIFF strips): 2**27 pixels is 384 MiB as RGB.
MAX_PLAIN_PIXELS = 2**27

RemoteAccess = Literal["range", "download"]


class SlideError(ValueError):
    """A slide that cannot be opened or decoded, with the file and the reason."""


@dataclass(frozen=True)
class Level:
    width: int
    height: int
    downsample: float  # level-0 pixels per pixel of this level


@dataclass(frozen=True)
class SlideStorage:
    """Access settings for remote slides: S3 endpoint, download cache and TIFF access mode."""

    endpoint_url: str | None = None  # S3-compatible endpoint; None uses AWS
    cache_dir: str | None = None  # None: <system temp>/cervi_ray_slides
    remote_access: RemoteAccess = "range"  # remote TIFF: range reads, or download first

    def filesystem(self) -> Any:
        """Return an fsspec S3 filesystem; credentials come from the standard AWS chain."""
        import fsspec

        return fsspec.filesystem("s3", endpoint_url=self.endpoint_url) if self.endpoint_url else fsspec.filesystem("s3")

    def local_copy(self, uri: str) -> str:
        """Download `uri` into the cache once (an MRXS file with its data folder) and return the path."""
        folder = Path(self.cache_dir or Path(tempfile.gettempdir()) / "cervi_ray_slides")
        target = folder / hashlib.sha256(uri.encode()).hexdigest()[:16] / PurePosixPath(uri).name
        if target.is_file():
            return str(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        fs = self.filesystem()
        remote = uri[len(S3_SCHEME):]
        if target.suffix.lower() == ".mrxs":
            fs.get(remote[: -len(".mrxs")], str(target.with_suffix("")), recursive=True)
        # Download under a temporary name, then rename, so a crash never leaves a partial file.
        partial = target.with_name(f".{target.name}.{os.getpid()}.part")
        fs.get(remote, str(partial))
        os.replace(partial, target)
        logger.debug("downloaded %s to %s", uri, target)
        return str(target)


class Slide:
    """An open slide: levels, recorded resolution and region reads."""

    def __init__(self, name: str, levels: list[Level], mpp: float | None, objective_power: float | None):
        self.name = name
        self.levels = levels
        self.mpp = mpp  # level-0 microns per pixel from metadata, None when unrecorded
        self.objective_power = objective_power

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.levels[0].width, self.levels[0].height

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Return the (height, width, 3) uint8 region at (x, y) of `level`, inside the level."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class OpenSlideSlide(Slide):
    def __init__(self, path: str, name: str):
        self._slide = openslide.OpenSlide(path)
        properties = self._slide.properties
        levels = [
            Level(width, height, float(downsample))
            for (width, height), downsample in zip(self._slide.level_dimensions, self._slide.level_downsamples)
        ]
        mpp_x = _number(properties.get(openslide.PROPERTY_NAME_MPP_X))
        mpp_y = _number(properties.get(openslide.PROPERTY_NAME_MPP_Y))
        mpp = _mean_mpp(name, mpp_x, mpp_y)
        super().__init__(name, levels, mpp, _number(properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)))

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        downsample = self.levels[level].downsample
        location = (int(round(x * downsample)), int(round(y * downsample)))  # OpenSlide takes level-0 coordinates
        rgba = np.asarray(self._slide.read_region(location, level, (width, height)))
        # OpenSlide returns premultiplied alpha, so compositing over white adds 255 - alpha.
        rgb = rgba[..., :3].astype(np.uint16) + (255 - rgba[..., 3:4]).astype(np.uint16)
        return np.minimum(rgb, 255).astype(np.uint8)

    def close(self) -> None:
        self._slide.close()


class TiffFileSlide(Slide):
    """TIFF read segment by segment (tiles or strips), so a region costs only what it covers."""

    def __init__(self, source: str | BinaryIO, name: str):
        self._tif = tifffile.TiffFile(source)
        self._handle = None if isinstance(source, str) else source  # tifffile leaves given handles open
        try:
            series = self._tif.series[0]
            self._pages = [level.keyframe for level in series.levels]
            for page in self._pages:
                _check_tiff_page(page, name)
            width0 = self._pages[0].imagewidth
            levels = [Level(p.imagewidth, p.imagelength, width0 / p.imagewidth) for p in self._pages]
            mpp, objective = _tiff_resolution(self._tif, name)
        except Exception:
            self.close()
            raise
        super().__init__(name, levels, mpp, objective)
        self._segments: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def _segment(self, level: int, index: int) -> np.ndarray | None:
        """Decode one tile or strip as (h, w, samples), keeping the last 64 in memory."""
        key = (level, index)
        if key in self._segments:
            self._segments.move_to_end(key)
            return self._segments[key]
        page = self._pages[level]
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        if count == 0:
            return None  # a tile the writer left out: background
        handle = self._tif.filehandle
        with handle.lock:
            handle.seek(offset)
            data = handle.read(count)
        if len(data) < count:
            raise SlideError(f"{self.name}: TIFF segment {index} of level {level} is truncated")
        segment = page.decode(data, index, jpegtables=page.jpegtables)[0]
        segment = np.asarray(segment)[0]  # (1, h, w, samples) -> (h, w, samples)
        self._segments[key] = segment
        if len(self._segments) > 64:
            self._segments.popitem(last=False)
        return segment

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        page = self._pages[level]
        if page.is_tiled:
            seg_width, seg_height = page.tilewidth, page.tilelength
        else:
            seg_width, seg_height = page.imagewidth, min(page.rowsperstrip, page.imagelength)
        across = -(-page.imagewidth // seg_width)
        out = np.full((height, width, page.samplesperpixel), _fill_for(page), dtype=np.uint8)
        for row in range(y // seg_height, (y + height - 1) // seg_height + 1):
            for col in range(x // seg_width, (x + width - 1) // seg_width + 1):
                segment = self._segment(level, row * across + col)
                if segment is None:
                    continue
                top, left = row * seg_height, col * seg_width
                y0, y1 = max(y, top), min(y + height, top + segment.shape[0])
                x0, x1 = max(x, left), min(x + width, left + segment.shape[1])
                if y1 > y0 and x1 > x0:
                    out[y0 - y : y1 - y, x0 - x : x1 - x] = segment[y0 - top : y1 - top, x0 - left : x1 - left]
        return _to_rgb(out, page.photometric == tifffile.PHOTOMETRIC.MINISWHITE)

    def close(self) -> None:
        self._tif.close()
        if self._handle is not None:
            self._handle.close()


class PlainImageSlide(Slide):
    """A PNG, JPEG, BMP or TIFF decoded whole into memory as one level."""

    def __init__(self, source: str | BinaryIO, name: str):
        with warnings.catch_warnings():
            # PIL warns from 89 M pixels; MAX_PLAIN_PIXELS below is the limit that applies here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(source)
        with opened as image:
            width, height = image.size
            if width * height > MAX_PLAIN_PIXELS:
                raise SlideError(
                    f"{name}: plain image of {width} x {height} pixels exceeds the {MAX_PLAIN_PIXELS} "
                    f"pixels decoded whole. Convert it to a tiled pyramidal TIFF"
                )
            if image.mode.startswith(("I", "F")):
                raise SlideError(f"{name}: image mode {image.mode} (more than 8 bits) is not supported; convert to 8-bit RGB")
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                white = Image.new("RGBA", image.size, (BACKGROUND_VALUE,) * 4)
                image = Image.alpha_composite(white, image.convert("RGBA"))
            self._pixels = np.asarray(image.convert("RGB"))  # (H, W, 3)
            dpi = image.info.get("dpi")
        mpp = None
        if isinstance(dpi, tuple) and len(dpi) == 2 and all(_number(value) for value in dpi):
            mpp = _mean_mpp(name, 25400.0 / float(dpi[0]), 25400.0 / float(dpi[1]))
        super().__init__(name, [Level(width, height, 1.0)], mpp, None)

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        return self._pixels[y : y + height, x : x + width]


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) and number > 0 else None


def _mean_mpp(name: str, mpp_x: float | None, mpp_y: float | None) -> float | None:
    if mpp_x is None or mpp_y is None:
        return mpp_x or mpp_y
    # NOTE: tiles are square in model pixels, so a slide with non-square pixels is resampled
    # with the mean pixel size and comes out slightly stretched.
    if not np.isclose(mpp_x, mpp_y, rtol=0.01):
        logger.warning("slide %s has non-square pixels (%g x %g microns); using their mean", name, mpp_x, mpp_y)
    return (mpp_x + mpp_y) / 2


def _check_tiff_page(page: Any, name: str) -> None:
    if page.dtype != np.uint8:
        raise SlideError(f"{name}: TIFF samples of type {page.dtype} are not supported; convert to 8-bit")
    if page.samplesperpixel not in (1, 3, 4) or (page.samplesperpixel > 1 and page.planarconfig != 1):
        raise SlideError(
            f"{name}: TIFF with {page.samplesperpixel} samples per pixel in planar configuration "
            f"{page.planarconfig} is not supported; store RGB interleaved (contiguous)"
        )
    if page.photometric not in (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.MINISWHITE, tifffile.PHOTOMETRIC.RGB):
        raise SlideError(f"{name}: TIFF photometric interpretation {page.photometric.name} is not supported")
    if page.compression not in tifffile.TIFF.DECOMPRESSORS:
        raise SlideError(f"{name}: TIFF compression {page.compression.name} needs the imagecodecs package")
    if not page.is_tiled and page.imagewidth * min(page.rowsperstrip, page.imagelength) > MAX_PLAIN_PIXELS:
        raise SlideError(f"{name}: untiled TIFF strips larger than {MAX_PLAIN_PIXELS} pixels; convert to a tiled TIFF")


def _fill_for(page: Any) -> int:
    return 0 if page.photometric == tifffile.PHOTOMETRIC.MINISWHITE else BACKGROUND_VALUE


def _to_rgb(pixels: np.ndarray, inverted: bool) -> np.ndarray:
    """Convert (h, w, samples) uint8 with 1, 3 or 4 samples to (h, w, 3) RGB over white."""
    if inverted:
        pixels = 255 - pixels
    if pixels.shape[2] == 1:
        return np.repeat(pixels, 3, axis=2)
    if pixels.shape[2] == 4:
        alpha = pixels[..., 3:4].astype(np.float32) / 255.0
        return np.rint(pixels[..., :3] * alpha + BACKGROUND_VALUE * (1.0 - alpha)).astype(np.uint8)
    return pixels


def _tiff_resolution(tif: tifffile.TiffFile, name: str) -> tuple[float | None, float | None]:
    """Return (MPP, objective power) from OME metadata, an Aperio description or resolution tags."""
    page = tif.pages[0]
    description = page.description or ""
    objective = _number(_match(r"AppMag\s*=\s*([\d.]+)", description))
    if description.startswith("Aperio"):
        aperio = _number(_match(r"MPP\s*=\s*([\d.]+)", description))
        if aperio:
            return aperio, objective
    if tif.is_ome and tif.ome_metadata:
        size = _number(_match(r'PhysicalSizeX="([\d.eE+-]+)"', tif.ome_metadata))
        unit = _match(r'PhysicalSizeXUnit="([^"]+)"', tif.ome_metadata) or "µm"
        factor = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}.get(unit)
        if size and factor:
            return size * factor, objective
    unit = page.tags.get("ResolutionUnit")
    microns_per_unit = {2: 25400.0, 3: 10000.0}.get(int(unit.value) if unit else 0)  # inch, centimetre
    resolutions = [page.tags.get("XResolution"), page.tags.get("YResolution")]
    if microns_per_unit and all(resolutions):
        pixels_per_unit = [_number(tag.value[0] / tag.value[1]) if tag.value[1] else None for tag in resolutions]
        if all(pixels_per_unit):
            return _mean_mpp(name, microns_per_unit / pixels_per_unit[0], microns_per_unit / pixels_per_unit[1]), objective
    return None, objective


def _match(pattern: str, text: str) -> str | None:
    found = re.search(pattern, text)
    return found.group(1) if found else None


def open_slide(uri: str, storage: SlideStorage = SlideStorage()) -> Slide:
    """Open a local path or s3:// URI with the reader for its extension (see the module docstring).

    Raises SlideError naming the slide and what each reader reported.
    """
    name = PurePosixPath(uri).name
    extension = PurePosixPath(uri).suffix.lower()
    if extension not in SLIDE_EXTENSIONS:
        raise SlideError(f"{uri}: extension {extension!r} is not a slide type; supported: {' '.join(SLIDE_EXTENSIONS)}")
    remote = uri.startswith(S3_SCHEME)
    failures: list[str] = []

    if remote and extension in TIFF_EXTENSIONS and storage.remote_access == "range":
        handle = storage.filesystem().open(uri[len(S3_SCHEME):], "rb", block_size=2**20)
        try:
            return TiffFileSlide(handle, name)
        except Exception as e:  # any decoder error: try the downloaded copy with every reader
            handle.close()
            failures.append(f"tifffile range reads: {type(e).__name__}: {e}")
    if remote and extension in PLAIN_EXTENSIONS:
        fs = storage.filesystem()
        size = fs.size(uri[len(S3_SCHEME):])
        if size > MAX_PLAIN_PIXELS * 4:  # larger than any image of MAX_PLAIN_PIXELS, even uncompressed
            raise SlideError(f"{uri}: {size} bytes is too large for a plain image; convert it to a tiled pyramidal TIFF")
        data = fs.cat_file(uri[len(S3_SCHEME):])
        return _try_readers(uri, [("PIL", lambda: PlainImageSlide(io.BytesIO(data), name))], failures)
    path = storage.local_copy(uri) if remote else uri
    if not Path(path).is_file():
        raise SlideError(f"{uri}: file not found")

    readers: list[tuple[str, Any]] = []
    if extension in OPENSLIDE_EXTENSIONS:
        readers.append(("OpenSlide", lambda: OpenSlideSlide(path, name)))
    elif extension in TIFF_EXTENSIONS:
        readers.append(("tifffile", lambda: TiffFileSlide(path, name)))
        readers.append(("OpenSlide", lambda: OpenSlideSlide(path, name)))
        readers.append(("PIL", lambda: PlainImageSlide(path, name)))
    else:
        readers.append(("PIL", lambda: PlainImageSlide(path, name)))
    return _try_readers(uri, readers, failures)


def _try_readers(uri: str, readers: list[tuple[str, Any]], failures: list[str]) -> Slide:
    for reader_name, build in readers:
        try:
            return build()
        except Exception as e:  # decoders raise many types; each one's message is reported below
            failures.append(f"{reader_name}: {type(e).__name__}: {e}")
    raise SlideError(
        f"{uri} could not be opened as a slide ({'; '.join(failures)}). Replace it with a complete copy "
        "in a supported format, or leave it out of the input"
    )


def read_window(slide: Slide, level: int, box: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    """Read a level box (x0, y0, x1, y1), clipped to the level, resized to size (width, height)."""
    level_info = slide.levels[level]
    x0, y0 = max(0, box[0]), max(0, box[1])
    x1, y1 = min(level_info.width, box[2]), min(level_info.height, box[3])
    if x1 <= x0 or y1 <= y0:
        raise SlideError(f"{slide.name}: box {box} lies outside level {level} ({level_info.width} x {level_info.height})")
    region = np.ascontiguousarray(slide.read(level, x0, y0, x1 - x0, y1 - y0))
    return resize(region, size)


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize (h, w, 3) to size (width, height): area averaging to shrink, bilinear to enlarge."""
    width, height = size
    if image.shape[1] == width and image.shape[0] == height:
        return image
    shrinking = width * height < image.shape[0] * image.shape[1]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


class SlideCache:
    """Open slides of one worker process, the least recently used closed beyond `capacity`."""

    def __init__(self, storage: SlideStorage, capacity: int = 4):
        self.storage = storage
        self.capacity = capacity
        self._open: OrderedDict[str, Slide] = OrderedDict()

    def get(self, uri: str) -> Slide:
        if uri in self._open:
            self._open.move_to_end(uri)
            return self._open[uri]
        slide = open_slide(uri, self.storage)
        self._open[uri] = slide
        if len(self._open) > self.capacity:
            self._open.popitem(last=False)[1].close()
        return slide
