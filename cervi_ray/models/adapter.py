"""Feature adapter that projects student feature maps to the teacher's channel count."""

import torch
from torch import nn


class FeatureAdapter(nn.Module):
    """1 x 1 convolution from student channels to teacher channels for the feature MSE."""

    def __init__(self, student_channels: int, teacher_channels: int):
        super().__init__()
        self.proj = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features)  # (B, C_s, h, w) -> (B, C_t, h, w)


class StudentWithAdapter(nn.Module):
    """Student and adapter in one module, so DDP synchronises the adapter's gradients too."""

    def __init__(self, student: nn.Module, adapter: FeatureAdapter, feature_level: str):
        super().__init__()
        self.student = student
        self.adapter = adapter
        self.feature_level = feature_level

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features = self.student(x, return_features=True)
        return logits, self.adapter(features[self.feature_level])
