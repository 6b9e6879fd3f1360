"""Tests for cervi_ray.losses on tiny tensors whose losses can be checked by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cervi_ray.losses import DistillationLoss, SegmentationLoss, dice_loss, soft_target_kl

# Random-input tests draw shapes around (B, K, H, W) = (2, 3, 4, 4).


def _random_logits(*shape: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator)


def _random_target(batch_size: int, num_classes: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_classes, (batch_size, height, width), generator=generator)


# soft_target_kl


def test_kl_zero_for_equal_logits() -> None:
    logits = _random_logits(2, 3, 4, 4)
    # Identical distributions: KL is 0 at any temperature.
    for temperature in (1.0, 4.0):
        assert soft_target_kl(logits, logits.clone(), temperature).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_positive_when_logits_differ() -> None:
    student = _random_logits(2, 3, 4, 4, seed=1)
    teacher = _random_logits(2, 3, 4, 4, seed=2)
    # Different distributions: KL is strictly positive.
    assert soft_target_kl(student, teacher, 4.0).item() > 0.0


def test_kl_scales_by_temperature_squared() -> None:
    student = _random_logits(2, 3, 4, 4, seed=1)
    teacher = _random_logits(2, 3, 4, 4, seed=2)
    temperature = 3.0
    teacher_probs = torch.softmax(teacher / temperature, dim=1)
    student_probs = torch.softmax(student / temperature, dim=1)
    # Plain KL of the softened distributions, summed over classes, averaged over B * H * W.
    plain_kl = (teacher_probs * (teacher_probs.log() - student_probs.log())).sum(dim=1).mean()
    # soft_target_kl is T^2 = 9 times that plain KL.
    expected = temperature**2 * plain_kl
    assert soft_target_kl(student, teacher, temperature).item() == pytest.approx(expected.item(), rel=1e-5)


def test_kl_single_pixel_by_hand() -> None:
    temperature = 2.0
    # Teacher logits (2 ln 3, 0) / T = (ln 3, 0) soften to (3/4, 1/4); student (0, 0) to (1/2, 1/2).
    teacher = torch.tensor([2.0 * math.log(3.0), 0.0]).view(1, 2, 1, 1)
    student = torch.zeros(1, 2, 1, 1)
    # KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.1308120, times T^2 = 4 gives 0.5232481.
    expected = 4.0 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert expected == pytest.approx(0.5232481, abs=1e-7)
    assert soft_target_kl(student, teacher, temperature).item() == pytest.approx(expected, rel=1e-6)


def test_kl_stable_for_large_logits() -> None:
    student = torch.tensor([1000.0, -1000.0]).view(1, 2, 1, 1)
    teacher = torch.tensor([-1000.0, 1000.0]).view(1, 2, 1, 1)
    # Saturated, opposite distributions: the loss is large but finite (no log(0)).
    value = soft_target_kl(student, teacher, 1.0)
    assert torch.isfinite(value)
    assert value.item() > 100.0


def test_kl_does_not_backpropagate_to_teacher() -> None:
    student = _random_logits(1, 3, 2, 2, seed=1).requires_grad_()
    teacher = _random_logits(1, 3, 2, 2, seed=2).requires_grad_()
    soft_target_kl(student, teacher, 2.0).backward()
    # The teacher is a constant soft target: only the student gets a gradient.
    assert student.grad is not None
    assert teacher.grad is None


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_kl_rejects_bad_temperature(temperature: float) -> None:
    logits = torch.zeros(1, 2, 1, 1)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        soft_target_kl(logits, logits, temperature)


def test_kl_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError, match=r"\(1, 3, 2, 2\) and \(1, 3, 4, 4\)"):
        soft_target_kl(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 4, 4), 1.0)


# dice_loss


def test_dice_uniform_probabilities_by_hand() -> None:
    logits = torch.zeros(1, 2, 2, 2)  # every pixel gets p = (0.5, 0.5)
    target = torch.tensor([[[0, 0], [0, 1]]])
    # smooth 0: class 0 scores 2 * 1.5 / (2 + 3) = 0.6, class 1 scores 2 * 0.5 / (2 + 1) = 1/3,
    # so the loss is 1 - (0.6 + 1/3) / 2 = 0.5333.
    assert dice_loss(logits, target, smooth=0.0).item() == pytest.approx(1.0 - (0.6 + 1.0 / 3.0) / 2.0)
    # smooth 1: scores (3 + 1) / (5 + 1) = 2/3 and (1 + 1) / (3 + 1) = 1/2, loss 1 - 7/12 = 0.4167.
    assert dice_loss(logits, target, smooth=1.0).item() == pytest.approx(5.0 / 12.0)


def test_dice_near_zero_for_perfect_logits() -> None:
    target = _random_target(2, 3, 4, 4)
    # Confident one-hot logits: softmax is one-hot to float precision.
    logits = 100.0 * F.one_hot(target, 3).permute(0, 3, 1, 2).float()
    assert dice_loss(logits, target).item() == pytest.approx(0.0, abs=1e-6)


def test_dice_high_for_wrong_logits() -> None:
    target = torch.zeros(1, 2, 2, dtype=torch.int64)
    logits = torch.tensor([-100.0, 100.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2)
    # All pixels are class 0 but predicted class 1, smooth 0: both class scores are 0, loss 1.
    assert dice_loss(logits, target, smooth=0.0).item() == pytest.approx(1.0, abs=1e-6)


def test_dice_rejects_one_hot_target() -> None:
    with pytest.raises(ValueError, match=r"\(B, H, W\), got shape \(1, 3, 2, 2\)"):
        dice_loss(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2, dtype=torch.int64))


def test_dice_rejects_spatial_mismatch() -> None:
    with pytest.raises(ValueError, match=r"\(1, 2, 2\).*got \(1, 4, 4\)"):
        dice_loss(torch.zeros(1, 3, 2, 2), torch.zeros(1, 4, 4, dtype=torch.int64))


def test_dice_rejects_labels_out_of_range() -> None:
    target = torch.tensor([[[0, 1], [2, 3]]])
    with pytest.raises(ValueError, match=r"\[0, 2\].*from 0 to 3"):
        dice_loss(torch.zeros(1, 3, 2, 2), target)


def test_dice_rejects_float_target() -> None:
    with pytest.raises(ValueError, match="torch.int64, got torch.float32"):
        dice_loss(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2))


def test_dice_rejects_negative_smooth() -> None:
    with pytest.raises(ValueError, match="smooth must be >= 0, got -1"):
        dice_loss(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.int64), smooth=-1.0)


# SegmentationLoss


def test_segmentation_alpha_one_is_cross_entropy() -> None:
    logits = _random_logits(2, 3, 4, 4)
    target = _random_target(2, 3, 4, 4)
    # alpha = 1 keeps only the cross-entropy term.
    expected = F.cross_entropy(logits, target)
    assert SegmentationLoss(alpha=1.0)(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)


def test_segmentation_alpha_zero_is_dice() -> None:
    logits = _random_logits(2, 3, 4, 4)
    target = _random_target(2, 3, 4, 4)
    # alpha = 0 keeps only the Dice term.
    expected = dice_loss(logits, target, smooth=1.0)
    assert SegmentationLoss(alpha=0.0)(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)


def test_segmentation_mixes_both_terms() -> None:
    logits = _random_logits(2, 3, 4, 4)
    target = _random_target(2, 3, 4, 4)
    # alpha = 0.25: a quarter cross-entropy, three quarters Dice.
    expected = 0.25 * F.cross_entropy(logits, target) + 0.75 * dice_loss(logits, target)
    assert SegmentationLoss(alpha=0.25)(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_segmentation_rejects_alpha_outside_unit_interval(alpha: float) -> None:
    with pytest.raises(ValueError, match=rf"alpha must be in \[0, 1\], got {alpha}"):
        SegmentationLoss(alpha=alpha)


def test_segmentation_bfloat16_logits_give_float32_loss() -> None:
    logits = _random_logits(1, 3, 4, 4).to(torch.bfloat16)
    target = _random_target(1, 3, 4, 4)
    # Autocast-style low-precision logits are upcast, so the loss is float32 and finite.
    loss = SegmentationLoss()(logits, target)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)


# DistillationLoss


def _distillation_inputs(
    logit_size: int = 4,
    teacher_logit_size: int = 4,
    feature_size: int = 2,
    teacher_feature_size: int = 2,
    requires_grad: bool = False,
) -> dict[str, torch.Tensor]:
    inputs = {
        "student_logits": _random_logits(2, 3, logit_size, logit_size, seed=1),
        "teacher_logits": _random_logits(2, 3, teacher_logit_size, teacher_logit_size, seed=2),
        "student_features": _random_logits(2, 5, feature_size, feature_size, seed=3),
        "teacher_features": _random_logits(2, 5, teacher_feature_size, teacher_feature_size, seed=4),
    }
    if requires_grad:
        for tensor in inputs.values():
            tensor.requires_grad_()
    inputs["target"] = _random_target(2, 3, logit_size, logit_size)
    return inputs


def test_distillation_defaults_match_method() -> None:
    loss = DistillationLoss()
    # The method's weights 0.5 / 0.3 / 0.2 and temperature 4.
    assert (loss.soft_weight, loss.feature_weight, loss.seg_weight) == (0.5, 0.3, 0.2)
    assert loss.temperature == 4.0
    assert isinstance(loss.seg_loss, SegmentationLoss)


def test_distillation_total_is_weighted_sum() -> None:
    inputs = _distillation_inputs()
    loss = DistillationLoss(temperature=2.0, soft_weight=1.5, feature_weight=0.25, seg_weight=2.0)
    total, parts = loss(**inputs)
    assert set(parts) == {"soft", "feature", "seg", "total"}
    # total = 1.5 * soft + 0.25 * feature + 2.0 * seg.
    expected = 1.5 * parts["soft"] + 0.25 * parts["feature"] + 2.0 * parts["seg"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert parts["total"].item() == pytest.approx(total.item(), rel=1e-6)


def test_distillation_parts_match_standalone_losses() -> None:
    inputs = _distillation_inputs()
    seg_loss = SegmentationLoss(alpha=0.3)
    _, parts = DistillationLoss(temperature=3.0, seg_loss=seg_loss)(**inputs)
    # Each part equals the loss computed on its own.
    soft = soft_target_kl(inputs["student_logits"], inputs["teacher_logits"], 3.0)
    feature = F.mse_loss(inputs["student_features"], inputs["teacher_features"])
    seg = seg_loss(inputs["student_logits"], inputs["target"])
    assert parts["soft"].item() == pytest.approx(soft.item(), rel=1e-6)
    assert parts["feature"].item() == pytest.approx(feature.item(), rel=1e-6)
    assert parts["seg"].item() == pytest.approx(seg.item(), rel=1e-6)


def test_distillation_parts_are_detached() -> None:
    inputs = _distillation_inputs(requires_grad=True)
    total, parts = DistillationLoss()(**inputs)
    # Only the total carries a graph, so logging the parts keeps no graph alive.
    assert total.requires_grad
    for name, part in parts.items():
        assert not part.requires_grad, name


def test_distillation_gradients_reach_student_only() -> None:
    inputs = _distillation_inputs(requires_grad=True)
    total, _ = DistillationLoss()(**inputs)
    total.backward()
    # Student logits and features get nonzero gradients, the frozen teacher none.
    assert inputs["student_logits"].grad is not None
    assert inputs["student_logits"].grad.abs().sum().item() > 0.0
    assert inputs["student_features"].grad is not None
    assert inputs["student_features"].grad.abs().sum().item() > 0.0
    assert inputs["teacher_logits"].grad is None
    assert inputs["teacher_features"].grad is None


def test_distillation_resizes_teacher_logits_to_student() -> None:
    inputs = _distillation_inputs(logit_size=4, teacher_logit_size=8)
    _, parts = DistillationLoss(temperature=2.0)(**inputs)
    # The 8 x 8 teacher logits are bilinearly resized to the student's 4 x 4 before the KL.
    resized_teacher = F.interpolate(inputs["teacher_logits"], size=(4, 4), mode="bilinear", align_corners=False)
    expected = soft_target_kl(inputs["student_logits"], resized_teacher, 2.0)
    assert parts["soft"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_distillation_resizes_student_features_to_teacher() -> None:
    inputs = _distillation_inputs(feature_size=2, teacher_feature_size=4, requires_grad=True)
    total, parts = DistillationLoss()(**inputs)
    # The 2 x 2 student features are bilinearly resized to the teacher's 4 x 4 before the MSE.
    resized_student = F.interpolate(inputs["student_features"], size=(4, 4), mode="bilinear", align_corners=False)
    expected = F.mse_loss(resized_student, inputs["teacher_features"])
    assert parts["feature"].item() == pytest.approx(expected.item(), rel=1e-6)
    # The gradient flows back through the resize to the original 2 x 2 features.
    total.backward()
    assert inputs["student_features"].grad is not None
    assert inputs["student_features"].grad.shape == (2, 5, 2, 2)


def test_distillation_rejects_feature_channel_mismatch() -> None:
    inputs = _distillation_inputs()
    inputs["student_features"] = torch.zeros(2, 7, 2, 2)
    # The message names both shapes and the adapter fix.
    with pytest.raises(ValueError, match=r"\(2, 7, 2, 2\).*\(2, 5, 2, 2\).*adapter.*5 channels"):
        DistillationLoss()(**inputs)


def test_distillation_rejects_class_mismatch() -> None:
    inputs = _distillation_inputs()
    inputs["teacher_logits"] = torch.zeros(2, 2, 4, 4)
    # The message names both logit shapes.
    with pytest.raises(ValueError, match=r"number of classes K.*\(2, 3, 4, 4\).*\(2, 2, 4, 4\)"):
        DistillationLoss()(**inputs)


def test_distillation_rejects_batch_mismatch() -> None:
    inputs = _distillation_inputs()
    inputs["teacher_features"] = torch.zeros(3, 5, 2, 2)
    with pytest.raises(ValueError, match="same batch size B.*'teacher_features': 3"):
        DistillationLoss()(**inputs)


def test_distillation_rejects_3d_features() -> None:
    inputs = _distillation_inputs()
    inputs["student_features"] = torch.zeros(2, 5, 4)
    with pytest.raises(ValueError, match=r"student_features must be 4-D \(B, C, H, W\), got shape \(2, 5, 4\)"):
        DistillationLoss()(**inputs)


def test_distillation_rejects_target_mismatch() -> None:
    inputs = _distillation_inputs()
    inputs["target"] = torch.zeros(2, 8, 8, dtype=torch.int64)
    # The target must match the student logits, not the teacher's.
    with pytest.raises(ValueError, match=r"\(2, 4, 4\).*got \(2, 8, 8\)"):
        DistillationLoss()(**inputs)


@pytest.mark.parametrize("name", ["soft_weight", "feature_weight", "seg_weight"])
def test_distillation_rejects_negative_weight(name: str) -> None:
    with pytest.raises(ValueError, match=rf"{name} must be a finite number >= 0, got -0.1"):
        DistillationLoss(**{name: -0.1})


@pytest.mark.parametrize("temperature", [0.0, -2.0, float("inf")])
def test_distillation_rejects_bad_temperature(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        DistillationLoss(temperature=temperature)
