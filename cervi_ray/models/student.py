"""CerviSegNet student: Double Swin-Transformer encoder, Compressor bottleneck, light decoder."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.swin_transformer import PatchMerging
from torch import nn

from cervi_ray.models.compressor import Compressor
from cervi_ray.models.double_swin import DoubleSwinBlock
from cervi_ray.models.padding import crop_to, pad_to_multiple

PATCH_SIZE = 4  # patch partition: each 4 x 4 pixel patch becomes one token


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class StudentDecoder(nn.Module):
    """U-Net style decoder from the stride-32 bottleneck to stride 4.

    Each step upsamples by 2, concatenates the encoder map of that stride and fuses with a
    3 x 3 convolution. The classifier then runs at stride 4 and its logits are upsampled
    bilinearly, as DeepLabV3+ does, because full-resolution convolutions would cost more than
    the rest of the student.
    """

    def __init__(self, encoder_channels: Sequence[int], channels: Sequence[int]):
        super().__init__()
        if len(channels) != len(encoder_channels) - 1:
            raise ValueError(
                f"decoder_channels needs one width per skip connection "
                f"({len(encoder_channels) - 1}), got {list(channels)}"
            )
        skips = list(reversed(encoder_channels[:-1]))  # widths at strides 16, 8, 4
        in_channels = encoder_channels[-1]
        self.fuse = nn.ModuleList()
        for skip_channels, out_channels in zip(skips, channels):
            self.fuse.append(conv_bn_relu(in_channels + skip_channels, out_channels))
            in_channels = out_channels
        self.out_channels = in_channels

    def forward(self, bottleneck: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        # bottleneck: (B, C_32, H/32, W/32); skips: maps at strides 4, 8, 16 (B, C_s, H/s, W/s)
        x = bottleneck
        for fuse, skip in zip(self.fuse, reversed(skips)):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = fuse(torch.cat([x, skip], dim=1))
        return x  # (B, channels[-1], H/4, W/4)


class CerviSegNet(nn.Module):
    """Swin-based student segmentation network.

    Patch partition and linear embedding (stride 4), then one stage per entry of `depths`: patch
    merging (from the second stage on, halving the resolution and doubling the width) followed by
    that many Double Swin-Transformer blocks. Four stages with embed_dim 64 end in a
    (B, 512, H/32, W/32) map, 16 x 16 x 512 for a 512 x 512 input. The Compressor block refines
    that map, and the decoder restores stride 4 before the K-class classifier.

    Features returned with `return_features=True`:
      "encoder": the Compressor output, (B, 8 * embed_dim, H/32, W/32);
      "decoder": the last decoder map, (B, decoder_channels[-1], H/4, W/4).
    Inputs whose sides do not divide by 32 are reflect-padded and the logits cropped back.
    """

    def __init__(
        self,
        num_classes: int = 3,
        in_channels: int = 3,
        img_size: int = 512,
        embed_dim: int = 64,
        depths: Sequence[int] = (1, 1, 2, 1),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        window_size: int = 8,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.1,
        gate_hidden: int = 8,
        compressor_reduction: int = 4,
        decoder_channels: Sequence[int] = (256, 128, 64),
    ):
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(
                f"depths and num_heads need one entry per stage, got {list(depths)} and "
                f"{list(num_heads)}"
            )
        num_stages = len(depths)
        self.stride = PATCH_SIZE * 2 ** (num_stages - 1)
        widths = [embed_dim * 2**i for i in range(num_stages)]
        for width, heads in zip(widths, num_heads):
            if width % heads != 0:
                raise ValueError(f"stage width {width} must divide by its num_heads {heads}")

        self.patch_embed = PatchEmbed(
            img_size=img_size,
            patch_size=PATCH_SIZE,
            in_chans=in_channels,
            embed_dim=embed_dim,
            norm_layer=nn.LayerNorm,
            output_fmt="NHWC",
            strict_img_size=False,
        )
        # Stochastic depth grows linearly over the blocks, as in Swin.
        block_count = sum(depths)
        drop_rates = [drop_path_rate * i / max(block_count - 1, 1) for i in range(block_count)]

        self.stages = nn.ModuleList()
        resolution = img_size // PATCH_SIZE
        for index, (depth, heads) in enumerate(zip(depths, num_heads)):
            layers: list[nn.Module] = []
            if index > 0:
                layers.append(PatchMerging(widths[index - 1], widths[index]))
                resolution //= 2
            for _ in range(depth):
                layers.append(
                    DoubleSwinBlock(
                        dim=widths[index],
                        input_resolution=(resolution, resolution),
                        num_heads=heads,
                        window_size=window_size,
                        mlp_ratio=mlp_ratio,
                        drop_path=drop_rates.pop(0),
                        gate_hidden=gate_hidden,
                    )
                )
            self.stages.append(nn.Sequential(*layers))
        self.stage_norms = nn.ModuleList([nn.LayerNorm(width) for width in widths])

        self.compressor = Compressor(widths[-1], reduction=compressor_reduction)
        self.decoder = StudentDecoder(widths, decoder_channels)
        self.classifier = nn.Conv2d(self.decoder.out_channels, num_classes, kernel_size=1)
        self.feature_channels = {"encoder": widths[-1], "decoder": self.decoder.out_channels}

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, size = pad_to_multiple(x, self.stride)
        tokens = self.patch_embed(x)  # (B, H/4, W/4, C)

        stage_maps = []
        for stage, norm in zip(self.stages, self.stage_norms):
            tokens = stage(tokens)  # (B, H/s, W/s, C_s)
            stage_maps.append(norm(tokens))

        bottleneck = self.compressor(stage_maps[-1])  # (B, H/32, W/32, C_32)
        bottleneck = bottleneck.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)
        skips = [m.permute(0, 3, 1, 2) for m in stage_maps[:-1]]  # strides 4, 8, 16

        decoder_features = self.decoder(bottleneck, skips)  # (B, C_dec, H/4, W/4)
        logits = self.classifier(decoder_features)
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        logits = crop_to(logits, size)  # (B, K, H, W)
        if not return_features:
            return logits
        return logits, {"encoder": bottleneck, "decoder": decoder_features}
