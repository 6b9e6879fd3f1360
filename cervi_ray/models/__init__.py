"""Teacher, student and adapter networks: plain nn.Modules with no Ray and no I/O."""

from typing import Literal

from cervi_ray.config import ModelConfig
from cervi_ray.models.adapter import FeatureAdapter, StudentWithAdapter
from cervi_ray.models.baselines import BASELINE_ARCHS, BaselineSegmenter
from cervi_ray.models.student import CerviSegNet
from cervi_ray.models.teacher import DeepLabV3PlusTeacher

ModelKind = Literal["teacher", "student", "unet", "unetplusplus", "deeplabv3"]
MODEL_KINDS = ("teacher", "student", *BASELINE_ARCHS)


def build_teacher(config: ModelConfig, num_classes: int) -> DeepLabV3PlusTeacher:
    teacher = config.teacher
    return DeepLabV3PlusTeacher(
        num_classes=num_classes,
        encoder=teacher.encoder,
        encoder_weights=teacher.encoder_weights,
        output_stride=teacher.output_stride,
        decoder_channels=teacher.decoder_channels,
        in_channels=config.in_channels,
    )


def build_student(config: ModelConfig, num_classes: int) -> CerviSegNet:
    student = config.student
    return CerviSegNet(
        num_classes=num_classes,
        in_channels=config.in_channels,
        img_size=config.input_size,
        embed_dim=student.embed_dim,
        depths=student.depths,
        num_heads=student.num_heads,
        window_size=student.window_size,
        mlp_ratio=student.mlp_ratio,
        drop_path_rate=student.drop_path_rate,
        gate_hidden=student.gate_hidden,
        compressor_reduction=student.compressor_reduction,
        decoder_channels=student.decoder_channels,
    )


def build_model(kind: ModelKind, config: ModelConfig, num_classes: int):
    if kind == "teacher":
        return build_teacher(config, num_classes)
    if kind == "student":
        return build_student(config, num_classes)
    if kind in BASELINE_ARCHS:
        baseline = config.baselines
        return BaselineSegmenter(
            kind, num_classes, baseline.encoder, baseline.encoder_weights, config.in_channels
        )
    raise ValueError(f"model kind must be one of {MODEL_KINDS}, got {kind!r}")


__all__ = [
    "BaselineSegmenter",
    "CerviSegNet",
    "DeepLabV3PlusTeacher",
    "FeatureAdapter",
    "StudentWithAdapter",
    "build_model",
    "build_student",
    "build_teacher",
]
