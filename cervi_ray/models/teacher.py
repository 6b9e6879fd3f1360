"""DeepLabV3+ teacher: a configurable CNN encoder from segmentation_models_pytorch or timm."""

import logging

import segmentation_models_pytorch as smp
import torch
from torch import nn

from cervi_ray.models.padding import crop_to, pad_to_multiple

logger = logging.getLogger(__name__)


class DeepLabV3PlusTeacher(nn.Module):
    """DeepLabV3+ that can also return the feature maps used for feature distillation.

    Features returned with `return_features=True`:
      "encoder": the deepest encoder map, (B, C_enc, H/16, W/16) at output stride 16;
      "decoder": the fused ASPP + low-level map before the classifier, (B, 256, H/4, W/4).
    Inputs of any size are reflect-padded to a multiple of the output stride and cropped back.
    """

    def __init__(
        self,
        num_classes: int = 3,
        encoder: str = "resnet101",
        encoder_weights: str | None = None,
        output_stride: int = 16,
        decoder_channels: int = 256,
        in_channels: int = 3,
    ):
        super().__init__()
        try:
            self.net = smp.DeepLabV3Plus(
                encoder_name=encoder,
                encoder_weights=encoder_weights,
                encoder_output_stride=output_stride,
                decoder_channels=decoder_channels,
                in_channels=in_channels,
                classes=num_classes,
            )
        except KeyError as e:
            raise ValueError(
                f"unknown teacher encoder {encoder!r}: use a segmentation_models_pytorch encoder "
                "name such as 'resnet101' or a timm model prefixed with 'tu-' such as "
                "'tu-resnet50d'"
            ) from e
        self.output_stride = output_stride
        self.feature_channels = {
            "encoder": self.net.encoder.out_channels[-1],
            "decoder": decoder_channels,
        }

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, size = pad_to_multiple(x, self.output_stride)
        encoder_maps = self.net.encoder(x)  # list of (B, C_i, H/2^i, W/2^i)
        decoder_features = self.net.decoder(encoder_maps)  # (B, 256, H/4, W/4)
        logits = crop_to(self.net.segmentation_head(decoder_features), size)  # (B, K, H, W)
        if not return_features:
            return logits
        return logits, {"encoder": encoder_maps[-1], "decoder": decoder_features}
