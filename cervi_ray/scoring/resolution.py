"""Slide and model resolutions, and the pyramid level and resampling that make them match.

Resolutions are pixel sizes in microns per pixel (MPP). When only an objective magnification is
known, the scorer uses the usual brightfield convention MPP = 10 / magnification (0.25 at 40x,
0.5 at 20x). It is a convention, not a measurement: real scanners differ by a few percent.

The demo and baby checkpoints record no MPP, only the magnification the model saw. The ISBI
images come from a 40x objective and training resamples them by data.scale. The demo model
(scale 0.5) therefore works at 20x, which the convention makes 0.5 MPP, and the baby model
(scale 0.25) at 10x, 1.0 MPP.
"""

import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

logger = logging.getLogger(__name__)

MICRONS_AT_1X = 10.0  # MPP = MICRONS_AT_1X / objective magnification
LEVEL_TOLERANCE = 0.01  # a level up to 1 % coarser than needed still counts as not coarser
# Resolution metadata outside this range is ignored as implausible for microscopy. Plain images
# often carry a screen or print resolution (72 dpi is 352.8 microns per pixel).
PLAUSIBLE_MPP = (0.01, 50.0)

ResolutionSource = Literal["metadata", "objective_power", "override", "checkpoint_mpp", "checkpoint_magnification"]


class ResolutionError(ValueError):
    """A slide or model whose pixel size cannot be determined, with the option that sets it."""


@dataclass(frozen=True)
class Resolution:
    mpp: float  # microns per pixel
    source: ResolutionSource


def is_plausible_mpp(mpp: float | None) -> bool:
    return mpp is not None and np.isfinite(mpp) and PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]


def slide_resolution(
    slide_id: str, metadata_mpp: float | None, objective_power: float | None, override: float | None
) -> Resolution:
    """Pick the slide's level-0 MPP: metadata, else objective power, else the override.

    Raises ResolutionError naming the slide and scoring.slide_mpp when none is available.
    """
    if is_plausible_mpp(metadata_mpp):
        if override is not None and not np.isclose(override, metadata_mpp, rtol=0.01):
            logger.warning(
                "slide %s: scoring.slide_mpp=%g is ignored because the slide records %g microns per pixel",
                slide_id, override, metadata_mpp,
            )
        return Resolution(float(metadata_mpp), "metadata")
    if objective_power is not None and np.isfinite(objective_power) and objective_power > 0:
        return Resolution(MICRONS_AT_1X / float(objective_power), "objective_power")
    if override is not None:
        return Resolution(float(override), "override")
    raise ResolutionError(
        f"slide {slide_id} records neither a pixel size nor an objective magnification. Set "
        f"scoring.slide_mpp to its microns per pixel (for example --set scoring.slide_mpp=0.25 "
        f"for a 40x scan)"
    )


def model_resolution(meta: dict[str, Any], override: float | None) -> Resolution:
    """Pick the model's MPP: the checkpoint's, else its magnification, else scoring.model_mpp.

    Raises ResolutionError naming scoring.model_mpp when the checkpoint records neither.
    """
    training = meta.get("training_resolution") or {}
    mpp = training.get("mpp")
    magnification = training.get("magnification")
    recorded: Resolution | None = None
    if mpp is not None and mpp > 0:
        recorded = Resolution(float(mpp), "checkpoint_mpp")
    elif magnification is not None and magnification > 0:
        recorded = Resolution(MICRONS_AT_1X / float(magnification), "checkpoint_magnification")
    if recorded is not None:
        if override is not None and not np.isclose(override, recorded.mpp, rtol=0.01):
            logger.warning(
                "scoring.model_mpp=%g is ignored because the checkpoint records %g microns per pixel (%s)",
                override, recorded.mpp, recorded.source,
            )
        return recorded
    if override is not None:
        return Resolution(float(override), "override")
    raise ResolutionError(
        "the checkpoint records neither the pixel size nor the magnification it was trained at. "
        "Set scoring.model_mpp to the microns per pixel of its training images after data.scale "
        "(for example --set scoring.model_mpp=0.5)"
    )


@dataclass(frozen=True)
class LevelChoice:
    """Pyramid level and resampling factors that give tiles the model's pixel size."""

    level: int
    downsample: float  # level-0 pixels per pixel of the chosen level
    level0_per_model_pixel: float  # model MPP / slide MPP
    level_per_model_pixel: float  # resampling factor at the chosen level; > 1 shrinks

    @property
    def upsamples(self) -> bool:
        return self.level_per_model_pixel < 1.0 - LEVEL_TOLERANCE


def choose_level(downsamples: list[float], slide_mpp: float, model_mpp: float) -> LevelChoice:
    """Choose the coarsest pyramid level that is not coarser than the model's pixels.

    Reading the coarsest such level and then shrinking keeps reads small without losing detail
    the model needs. A level up to LEVEL_TOLERANCE coarser still counts, because pyramid
    downsamples are rounded (a nominal 4x level may be 4.002x). When even level 0 is coarser than
    the model's pixels, level 0 is read and enlarged.
    """
    if not downsamples:
        raise ValueError("downsamples must list at least level 0")
    if slide_mpp <= 0 or model_mpp <= 0:
        raise ValueError(f"pixel sizes must be > 0, got slide {slide_mpp} and model {model_mpp}")
    target = model_mpp / slide_mpp
    level = 0
    for index, downsample in enumerate(downsamples):
        if downsample <= target * (1.0 + LEVEL_TOLERANCE) and downsample > downsamples[level]:
            level = index
    downsample = float(downsamples[level])
    return LevelChoice(level, downsample, target, target / downsample)


def model_pixel_size(width0: int, height0: int, level0_per_model_pixel: float) -> tuple[int, int]:
    """Return the slide's width and height in model pixels, rounded down, at least 1.

    Rounding down drops less than one model pixel at the right and bottom border, so no tile of
    a slide larger than one tile ever reaches past level 0.
    """
    width = max(1, int(np.floor(width0 / level0_per_model_pixel + 1e-9)))
    height = max(1, int(np.floor(height0 / level0_per_model_pixel + 1e-9)))
    return width, height
