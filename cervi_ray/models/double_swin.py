"""Double Swin-Transformer block: two parallel Swin paths balanced by an entropy-driven gate."""

import math

import torch
from timm.models.swin_transformer import SwinTransformerBlock
from torch import nn


def channel_entropy(x: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of the softmax over channels of each token, divided by log(C).

    x: (B, H, W, C). Returns (B, H, W, 1) in [0, 1]: 0 when one channel dominates the token,
    1 when all channels are equal.
    """
    channels = x.shape[-1]
    log_probs = torch.log_softmax(x, dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1, keepdim=True)
    return entropy / math.log(channels)


class EntropyGate(nn.Module):
    """Per-token weight in (0, 1) for path A, computed from the entropies of both paths.

    Starts at 0.5 for every token (zero-initialised output layer), so the two paths begin equal
    and the gate learns from there.
    """

    def __init__(self, hidden: int = 8):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2, hidden), nn.GELU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, path_a: torch.Tensor, path_b: torch.Tensor) -> torch.Tensor:
        entropies = torch.cat([channel_entropy(path_a), channel_entropy(path_b)], dim=-1)  # (B, H, W, 2)
        return torch.sigmoid(self.mlp(entropies))  # (B, H, W, 1)


class DoubleSwinBlock(nn.Module):
    """Two parallel paths of two Swin blocks each, mixed per token by an `EntropyGate`.

    Path A runs regular windows then shifted windows; path B runs them in the opposite order, so
    after the first block the paths have attended over different window partitions and do not
    start from the same features. The gate reads the entropy of each path after that first block
    and weighs the outputs of the second blocks: out = g * A + (1 - g) * B.
    """

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        num_heads: int,
        window_size: int = 8,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        gate_hidden: int = 8,
    ):
        super().__init__()
        shift = window_size // 2

        def swin(shift_size: int) -> SwinTransformerBlock:
            # dynamic_mask computes the shifted-window mask for the actual input size, so the
            # block accepts feature maps of any size, not only `input_resolution`.
            return SwinTransformerBlock(
                dim=dim,
                input_resolution=input_resolution,
                num_heads=num_heads,
                window_size=window_size,
                shift_size=shift_size,
                dynamic_mask=True,
                mlp_ratio=mlp_ratio,
                drop_path=drop_path,
            )

        self.path_a = nn.ModuleList([swin(0), swin(shift)])
        self.path_b = nn.ModuleList([swin(shift), swin(0)])
        self.gate = EntropyGate(gate_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, H, W, C), channels last as in timm's Swin blocks
        first_a = self.path_a[0](x)
        first_b = self.path_b[0](x)
        gate = self.gate(first_a, first_b)  # (B, H, W, 1)
        out_a = self.path_a[1](first_a)
        out_b = self.path_b[1](first_b)
        return gate * out_a + (1.0 - gate) * out_b
