"""Segmentation and distillation losses for the teacher and the CerviSegNet student.

Shape vocabulary: B batch, K classes, C feature channels, H and W spatial size.
Logits are (B, K, H, W) and targets are int64 label maps (B, H, W) with values in [0, K).

The distillation objective is the one of CerviSegNet-DistillPlus:
total = 0.5 * soft + 0.3 * feature + 0.2 * seg, where soft is the temperature-scaled KL
divergence from the teacher's to the student's class distribution (T = 4), feature is the
MSE between adapted student and teacher feature maps, and seg is cross-entropy plus Dice
against the ground truth.

All losses are computed in float32, even for float16 or bfloat16 inputs under autocast,
because the Dice sums run over every pixel of the batch and would overflow float16.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _check_logits_and_target(logits: Tensor, target: Tensor) -> None:
    """Raise ValueError unless logits are (B, K, H, W) and target is an int64 (B, H, W) map."""
    if logits.ndim != 4:
        raise ValueError(f"logits must have shape (B, K, H, W), got shape {tuple(logits.shape)}")
    if target.ndim != 3:
        raise ValueError(
            f"target must be a label map of shape (B, H, W), got shape {tuple(target.shape)}. "
            "Pass class indices, not one-hot masks"
        )
    batch_size, num_classes, height, width = logits.shape
    if tuple(target.shape) != (batch_size, height, width):
        raise ValueError(
            f"target shape must be (B, H, W) = {(batch_size, height, width)} to match logits "
            f"of shape {tuple(logits.shape)}, got {tuple(target.shape)}"
        )
    if target.dtype != torch.int64:
        raise ValueError(f"target dtype must be torch.int64, got {target.dtype}. Call target.long() first")
    if target.numel() > 0:
        # NOTE: min() and max() synchronise with the GPU once per call. The check turns an
        # opaque device-side assert in one_hot or cross_entropy into a readable error.
        low, high = int(target.min()), int(target.max())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"target labels must be in [0, {num_classes - 1}] for K = {num_classes} classes, "
                f"got values from {low} to {high}"
            )


def dice_loss(logits: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """Compute the soft multi-class Dice loss of logits (B, K, H, W) against labels (B, H, W).

    Let p be the softmax probabilities and y the one-hot target. The Dice score of class k
    is (2 * sum(p * y) + smooth) / (sum(p) + sum(y) + smooth), with the sums taken over the
    batch and all pixels of class channel k. The loss is 1 minus the mean score over the K
    classes, so it lies in [0, 1]. With smooth > 0, a class that is absent from the target
    and gets little predicted probability scores close to 1 instead of 0 / 0.

    Raises:
        ValueError: on mismatched shapes, a non-int64 target, labels outside [0, K)
            or a negative `smooth`.
    """
    if not smooth >= 0:
        raise ValueError(f"smooth must be >= 0, got {smooth}")
    _check_logits_and_target(logits, target)
    num_classes = logits.shape[1]

    probs = torch.softmax(logits.float(), dim=1)  # (B, K, H, W)
    # one_hot appends the class axis: (B, H, W, K) -> (B, K, H, W)
    target_one_hot = F.one_hot(target, num_classes).permute(0, 3, 1, 2).to(probs.dtype)

    sum_dims = (0, 2, 3)  # batch and pixels, leaving one value per class
    intersection = (probs * target_one_hot).sum(dim=sum_dims)  # (K,)
    cardinality = probs.sum(dim=sum_dims) + target_one_hot.sum(dim=sum_dims)  # (K,)
    dice_per_class = (2.0 * intersection + smooth) / (cardinality + smooth)
    return 1.0 - dice_per_class.mean()


class SegmentationLoss(nn.Module):
    """Cross-entropy plus soft Dice: alpha * CE + (1 - alpha) * Dice.

    Args:
        alpha: weight of the cross-entropy term, in [0, 1]. 1 gives plain cross-entropy
            and 0 plain Dice loss. The method does not fix alpha, and 0.5 weighs both terms equally.
        smooth: additive smoothing of the Dice ratio, see `dice_loss`.
    """

    def __init__(self, alpha: float = 0.5, smooth: float = 1.0) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if not smooth >= 0:
            raise ValueError(f"smooth must be >= 0, got {smooth}")
        self.alpha = float(alpha)
        self.smooth = float(smooth)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Return the scalar loss of logits (B, K, H, W) against int64 labels (B, H, W)."""
        _check_logits_and_target(logits, target)
        cross_entropy = F.cross_entropy(logits.float(), target)
        dice = dice_loss(logits, target, smooth=self.smooth)
        return self.alpha * cross_entropy + (1.0 - self.alpha) * dice

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, smooth={self.smooth}"


def soft_target_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Compute T^2 * KL(softmax(teacher / T) || softmax(student / T)) per pixel, averaged.

    Both logits are (B, K, H, W) of the same shape. The KL divergence is summed over the K
    classes and averaged over the B * H * W pixels. Dividing the logits by T shrinks the
    gradients of the KL term by about 1 / T^2, and the T^2 factor restores their scale.
    The teacher logits are constant soft targets, so they are detached and never receive
    a gradient.

    Raises:
        ValueError: if the shapes differ or `temperature` is not positive.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.ndim != 4:
        raise ValueError(
            f"student_logits must have shape (B, K, H, W), got shape {tuple(student_logits.shape)}"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student_logits and teacher_logits must have the same shape (B, K, H, W), got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}. Resize the teacher "
            "logits to the student's size first, as DistillationLoss does"
        )

    # log_softmax on both sides avoids log(0) when a softened probability underflows.
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=1)
    teacher_log_probs = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    kl_per_pixel = (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(dim=1)
    return temperature**2 * kl_per_pixel.mean()  # mean over (B, H, W)


class DistillationLoss(nn.Module):
    """Weighted sum of soft-target KL, feature MSE and segmentation loss for the student.

    total = soft_weight * soft + feature_weight * feature + seg_weight * seg, with
    - soft: `soft_target_kl` of the student logits against the teacher logits at `temperature`,
    - feature: MSE between the student features and the teacher features,
    - seg: `seg_loss` (cross-entropy plus Dice by default) of the student logits against the labels.

    The defaults are the method's weights 0.5 / 0.3 / 0.2 and T = 4. The teacher is frozen,
    so its logits and features are detached inside forward.

    Args:
        temperature: softmax temperature T of the soft term, > 0.
        soft_weight: weight of the soft term, >= 0.
        feature_weight: weight of the feature term, >= 0.
        seg_weight: weight of the segmentation term, >= 0.
        seg_loss: loss against the ground truth. None builds `SegmentationLoss()`.
    """

    def __init__(
        self,
        temperature: float = 4.0,
        soft_weight: float = 0.5,
        feature_weight: float = 0.3,
        seg_weight: float = 0.2,
        seg_loss: SegmentationLoss | None = None,
    ) -> None:
        super().__init__()
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        weights = {"soft_weight": soft_weight, "feature_weight": feature_weight, "seg_weight": seg_weight}
        for name, weight in weights.items():
            if not (weight >= 0 and math.isfinite(weight)):
                raise ValueError(f"{name} must be a finite number >= 0, got {weight}")
        self.temperature = float(temperature)
        self.soft_weight = float(soft_weight)
        self.feature_weight = float(feature_weight)
        self.seg_weight = float(seg_weight)
        self.seg_loss = seg_loss if seg_loss is not None else SegmentationLoss()

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        student_features: Tensor,
        teacher_features: Tensor,
        target: Tensor,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Return the total loss and its detached parts "soft", "feature", "seg" and "total".

        Args:
            student_logits: (B, K, H, W) student output.
            teacher_logits: (B, K, H_t, W_t) teacher output, bilinearly resized to (H, W)
                when the sizes differ.
            student_features: (B, C, h_s, w_s) student feature map, already projected to the
                teacher's C channels by an adapter. It is bilinearly resized to (h_t, w_t)
                when the sizes differ.
            teacher_features: (B, C, h_t, w_t) teacher feature map.
            target: (B, H, W) int64 labels for the segmentation term.

        Raises:
            ValueError: on tensors that are not 4-D, mismatched batch sizes, a different
                number of classes or feature channels, or a target that does not match
                the student logits.
        """
        self._check_shapes(student_logits, teacher_logits, student_features, teacher_features)
        teacher_logits = teacher_logits.detach()
        teacher_features = teacher_features.detach()

        # Soft targets: compare class distributions at the student's output resolution.
        if teacher_logits.shape[-2:] != student_logits.shape[-2:]:
            teacher_logits = F.interpolate(
                teacher_logits, size=student_logits.shape[-2:], mode="bilinear", align_corners=False
            )
        soft = soft_target_kl(student_logits, teacher_logits, self.temperature)

        # Features: compare at the teacher's feature resolution, which is fixed while
        # the student and its adapter train.
        if student_features.shape[-2:] != teacher_features.shape[-2:]:
            student_features = F.interpolate(
                student_features, size=teacher_features.shape[-2:], mode="bilinear", align_corners=False
            )
        feature = F.mse_loss(student_features.float(), teacher_features.float())

        seg = self.seg_loss(student_logits, target)

        total = self.soft_weight * soft + self.feature_weight * feature + self.seg_weight * seg
        parts = {
            "soft": soft.detach(),
            "feature": feature.detach(),
            "seg": seg.detach(),
            "total": total.detach(),
        }
        return total, parts

    @staticmethod
    def _check_shapes(
        student_logits: Tensor,
        teacher_logits: Tensor,
        student_features: Tensor,
        teacher_features: Tensor,
    ) -> None:
        tensors = {
            "student_logits": student_logits,
            "teacher_logits": teacher_logits,
            "student_features": student_features,
            "teacher_features": teacher_features,
        }
        for name, tensor in tensors.items():
            if tensor.ndim != 4:
                raise ValueError(f"{name} must be 4-D (B, C, H, W), got shape {tuple(tensor.shape)}")
        batch_sizes = {name: tensor.shape[0] for name, tensor in tensors.items()}
        if len(set(batch_sizes.values())) != 1:
            raise ValueError(f"all inputs must have the same batch size B, got {batch_sizes}")

        if student_logits.shape[1] != teacher_logits.shape[1]:
            raise ValueError(
                "student and teacher logits must have the same number of classes K, got "
                f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                f"{tuple(teacher_logits.shape)}. Build both models with the same number of classes"
            )
        if student_features.shape[1] != teacher_features.shape[1]:
            raise ValueError(
                "student and teacher features must have the same number of channels C, got "
                f"student_features {tuple(student_features.shape)} and teacher_features "
                f"{tuple(teacher_features.shape)}. An adapter (for example a 1 x 1 convolution) "
                f"must project the student features to the teacher's {teacher_features.shape[1]} "
                "channels before this loss"
            )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, soft_weight={self.soft_weight}, "
            f"feature_weight={self.feature_weight}, seg_weight={self.seg_weight}"
        )
