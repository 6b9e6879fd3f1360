"""Pad inputs to a multiple of a model's stride and crop outputs back."""

import torch
import torch.nn.functional as F


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad (B, C, H, W) on the bottom and right so H and W divide by `multiple`.

    Returns the padded tensor and the original (H, W) for `crop_to`. Reflection needs the pad to
    be smaller than the side, so tiny inputs fall back to replicate padding.
    """
    _, _, height, width = x.shape
    pad_h = (multiple - height % multiple) % multiple
    pad_w = (multiple - width % multiple) % multiple
    if pad_h == 0 and pad_w == 0:
        return x, (height, width)
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode), (height, width)


def crop_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop (B, C, H', W') back to the top-left (H, W) given by `pad_to_multiple`."""
    height, width = size
    return x[..., :height, :width]
