"""Baseline segmenters from segmentation_models_pytorch: U-Net, U-Net++ and DeepLabV3."""

from typing import Literal

import segmentation_models_pytorch as smp
import torch
from torch import nn

from cervi_ray.models.padding import crop_to, pad_to_multiple

BaselineArch = Literal["unet", "unetplusplus", "deeplabv3"]
BASELINE_ARCHS: tuple[BaselineArch, ...] = ("unet", "unetplusplus", "deeplabv3")
_CLASSES = {"unet": smp.Unet, "unetplusplus": smp.UnetPlusPlus, "deeplabv3": smp.DeepLabV3}
# U-Net and U-Net++ downsample five times; DeepLabV3 keeps output stride 8 with dilation.
_STRIDES = {"unet": 32, "unetplusplus": 32, "deeplabv3": 8}


class BaselineSegmenter(nn.Module):
    """An smp architecture with reflect padding to its stride and logits cropped back."""

    def __init__(
        self,
        arch: BaselineArch,
        num_classes: int = 3,
        encoder: str = "resnet18",
        encoder_weights: str | None = None,
        in_channels: int = 3,
    ):
        super().__init__()
        if arch not in _CLASSES:
            raise ValueError(f"baseline architecture must be one of {BASELINE_ARCHS}, got {arch!r}")
        self.arch = arch
        self.net = _CLASSES[arch](
            encoder_name=encoder, encoder_weights=encoder_weights, in_channels=in_channels, classes=num_classes
        )
        self.stride = _STRIDES[arch]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, size = pad_to_multiple(x, self.stride)
        return crop_to(self.net(x), size)  # (B, K, H, W)
