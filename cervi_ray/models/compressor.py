"""Compressor block applied to the student's stride-32 encoder output."""

import torch
from torch import nn


class Compressor(nn.Module):
    """Bottleneck refinement: reduce width, split into a linear and a 1-D convolution stream, merge.

    Three linear layers with ReLU (the first two halve and then reduce the width to
    dim / reduction), then two streams on the reduced tokens: a linear layer and a 1-D
    convolution along the row-major token sequence, each with ReLU. The streams are summed,
    a last linear layer restores the width, and a residual connection adds the input.
    The method's binary model ends the block with a sigmoid; with a K-class softmax head that
    sigmoid is left out so the block stays a residual feature refinement.
    """

    def __init__(self, dim: int, reduction: int = 4, kernel_size: int = 3):
        super().__init__()
        if dim % reduction != 0:
            raise ValueError(f"Compressor width {dim} must divide by reduction {reduction}")
        hidden = dim // reduction
        self.norm = nn.LayerNorm(dim)
        self.reduce = nn.Sequential(
            nn.Linear(dim, dim // 2), nn.ReLU(),
            nn.Linear(dim // 2, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
        )
        self.linear_stream = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU())
        self.conv_stream = nn.Sequential(
            nn.Conv1d(hidden, hidden, kernel_size, padding=kernel_size // 2), nn.ReLU()
        )
        self.expand = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        tokens = self.norm(x).reshape(B, H * W, C)
        reduced = self.reduce(tokens)  # (B, N, C / r)
        linear_out = self.linear_stream(reduced)  # (B, N, C / r)
        conv_out = self.conv_stream(reduced.transpose(1, 2)).transpose(1, 2)  # (B, C / r, N) -> (B, N, C / r)
        merged = self.expand(linear_out + conv_out)  # (B, N, C)
        return x + merged.reshape(B, H, W, C)
