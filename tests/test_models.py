"""Teacher and student networks: one shared tester, a tiny subclass per architecture."""

from pathlib import Path

import pytest
import torch

from cervi_ray.config import load_config
from cervi_ray.models import build_student, build_teacher
from cervi_ray.models.compressor import Compressor
from cervi_ray.models.complexity import count_macs, count_parameters
from cervi_ray.models.double_swin import DoubleSwinBlock, EntropyGate, channel_entropy

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BABY = load_config(CONFIGS / "baby.yaml").model
ODD_SIZES = [(64, 64), (61, 75), (33, 97), (17, 17)]


class ModelTester:
    """Shared checks; subclasses provide `build()` for one architecture."""

    num_classes = 3

    def build(self) -> torch.nn.Module:
        raise NotImplementedError

    @pytest.mark.parametrize("size", ODD_SIZES)
    def test_output_shape_any_size(self, size):
        model = self.build().eval()
        with torch.no_grad():
            logits = model(torch.randn(2, 3, *size))
        assert logits.shape == (2, self.num_classes, *size)

    def test_features_shapes(self):
        model = self.build().eval()
        with torch.no_grad():
            logits, features = model(torch.randn(1, 3, 64, 64), return_features=True)
        assert logits.shape == (1, self.num_classes, 64, 64)
        for level, channels in model.feature_channels.items():
            assert features[level].shape[1] == channels
        # the decoder map sits at stride 4 in both networks
        assert features["decoder"].shape[-2:] == (16, 16)

    def test_backward_reaches_every_parameter(self):
        model = self.build().train()
        logits = model(torch.randn(2, 3, 64, 64))
        logits.square().mean().backward()
        missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert missing == []

    def test_finite_outputs(self):
        model = self.build().eval()
        with torch.no_grad():
            logits = model(torch.randn(1, 3, 64, 64))
        assert torch.isfinite(logits).all()


class TestTeacher(ModelTester):
    def build(self):
        return build_teacher(BABY, self.num_classes)

    def test_unknown_encoder_names_fix(self):
        with pytest.raises(ValueError, match="unknown teacher encoder 'resnet_does_not_exist'"):
            build_teacher(BABY.model_copy(update={"teacher": BABY.teacher.model_copy(update={"encoder": "resnet_does_not_exist"})}), 3)


class TestStudent(ModelTester):
    def build(self):
        return build_student(BABY, self.num_classes)

    def test_two_class_head(self):
        model = build_student(BABY, 2).eval()
        with torch.no_grad():
            assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2, 64, 64)

    def test_mismatched_depths_and_heads(self):
        student = BABY.student.model_copy(update={"num_heads": [1, 2]})
        with pytest.raises(ValueError, match="one entry per stage"):
            build_student(BABY.model_copy(update={"student": student}), 3)

    def test_width_not_divisible_by_heads(self):
        student = BABY.student.model_copy(update={"num_heads": [3, 2, 2, 4]})
        with pytest.raises(ValueError, match="stage width 16 must divide by its num_heads 3"):
            build_student(BABY.model_copy(update={"student": student}), 3)


def test_full_student_bottleneck_is_16x16x512():
    # a 512 x 512 input ends in the 16 x 16 x 512 map at stride 32
    model = build_student(load_config(CONFIGS / "full.yaml").model, 3).eval()
    with torch.no_grad():
        _, features = model(torch.randn(1, 3, 512, 512), return_features=True)
    assert features["encoder"].shape == (1, 512, 16, 16)
    assert features["decoder"].shape[-2:] == (128, 128)


@pytest.mark.parametrize("profile", ["full.yaml", "demo.yaml"])
def test_student_costs_at_most_a_fifth_of_teacher(profile):
    # Counted on the meta device: shapes only, no memory or arithmetic.
    config = load_config(CONFIGS / profile).model
    config = config.model_copy(update={"teacher": config.teacher.model_copy(update={"encoder_weights": None})})
    with torch.device("meta"):
        teacher = build_teacher(config, 3)
        student = build_student(config, 3)
    teacher_macs = count_macs(teacher, config.input_size)
    student_macs = count_macs(student, config.input_size)
    assert student_macs * 5 <= teacher_macs, f"student {student_macs / 1e9:.1f} vs teacher {teacher_macs / 1e9:.1f} GMACs"


def test_full_teacher_is_over_80m_parameters():
    config = load_config(CONFIGS / "full.yaml").model
    config = config.model_copy(update={"teacher": config.teacher.model_copy(update={"encoder_weights": None})})
    with torch.device("meta"):
        teacher = build_teacher(config, 3)
    assert count_parameters(teacher) > 80e6


def test_channel_entropy_bounds():
    uniform = torch.zeros(1, 2, 2, 8)  # equal logits: maximal entropy, normalised to 1
    peaked = torch.zeros(1, 2, 2, 8)
    peaked[..., 0] = 100.0  # one dominant channel: entropy near 0
    assert torch.allclose(channel_entropy(uniform), torch.ones(1, 2, 2, 1))
    assert channel_entropy(peaked).max() < 1e-6


def test_entropy_gate_starts_balanced():
    gate = EntropyGate()
    weights = gate(torch.randn(2, 4, 4, 8), torch.randn(2, 4, 4, 8))
    assert weights.shape == (2, 4, 4, 1)
    assert torch.allclose(weights, torch.full_like(weights, 0.5))


def test_double_swin_paths_differ():
    # Paths start with different window partitions, so on the same input their first blocks
    # produce different features even with equal weights copied in.
    block = DoubleSwinBlock(dim=16, input_resolution=(8, 8), num_heads=2, window_size=4).eval()
    block.path_b[0].load_state_dict(block.path_a[0].state_dict())
    x = torch.randn(1, 8, 8, 16)
    with torch.no_grad():
        assert not torch.allclose(block.path_a[0](x), block.path_b[0](x))
        assert block(x).shape == x.shape


def test_compressor_residual_shape_and_validation():
    compressor = Compressor(dim=32, reduction=4)
    x = torch.randn(2, 4, 4, 32)
    assert compressor(x).shape == x.shape
    with pytest.raises(ValueError, match="must divide by reduction"):
        Compressor(dim=30, reduction=4)
