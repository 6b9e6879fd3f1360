"""Pruning: hand-checked magnitude masks, structured pruning of the baby student, golden reloads."""

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.swin_transformer import SwinTransformerBlock
from torch import nn

from cervi_ray.checkpoint import describe_model, load_model, save_checkpoint
from cervi_ray.config import load_config
from cervi_ray.models import build_student, build_teacher
from cervi_ray.models.reshape import reshape_to
from cervi_ray.pruning import (
    apply_masks,
    enforce_masks,
    global_threshold,
    load_masks,
    magnitude_masks,
    parameter_shapes,
    prunable_parameters,
    prune_by_magnitude,
    prune_student_structured,
    save_masks,
    sparsity_summary,
)

BABY = load_config(Path(__file__).resolve().parents[1] / "configs" / "baby.yaml")

# Weights of the hand-made two-layer model. Their 12 magnitudes in ascending order:
# 0.01 0.02 0.05 0.1 0.15 0.2 | 0.25 0.3 0.35 0.4 0.5 0.6
FIRST_WEIGHT = [[0.1, -0.5], [0.3, 0.05], [-0.2, 0.4]]
SECOND_WEIGHT = [[0.6, -0.01, 0.25], [-0.35, 0.15, 0.02]]


def hand_model() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(FIRST_WEIGHT))
        model[0].bias.copy_(torch.tensor([0.0, 0.1, 0.2]))
        model[2].weight.copy_(torch.tensor(SECOND_WEIGHT))
        model[2].bias.copy_(torch.tensor([0.3, 0.0]))
    return model


class TinyNet(nn.Module):
    """A conv, a linear layer, two norms and an output layer named like CerviSegNet's."""

    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(1, 2, 3)
        self.norm = nn.BatchNorm2d(2)
        self.mix = nn.Linear(2, 2)
        self.mix_norm = nn.LayerNorm(2)
        self.classifier = nn.Conv2d(2, 3, 1)


def baby_student(seed: int = 0) -> nn.Module:
    """The baby student in eval mode, with random BatchNorm statistics so channels differ."""
    torch.manual_seed(seed)
    model = build_student(BABY.model, num_classes=3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def assert_identical(expected: torch.Tensor, actual: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    max_difference = (expected - actual).abs().max().item()
    assert torch.equal(expected, actual), (
        f"reloaded outputs differ from the saved model's: max absolute difference {max_difference:.3g}"
    )


# Magnitude masks and thresholds on hand-made layers


def test_threshold_masks_linear_layers():
    params = prunable_parameters(hand_model())
    masks = magnitude_masks(params, 0.2)
    # |w| >= 0.2 keeps -0.5, 0.3, -0.2 (equal to the threshold) and 0.4 of the first layer
    assert masks["0.weight"].tolist() == [[False, True], [True, False], [True, True]]
    # and 0.6, 0.25, -0.35 of the second
    assert masks["2.weight"].tolist() == [[True, False, True], [True, False, False]]


def test_threshold_masks_conv_layer():
    conv = nn.Conv2d(1, 2, 2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[0.3, -0.1], [0.05, -0.4]]], [[[0.0, 0.7], [-0.12, 0.1]]]]))
    masks = magnitude_masks(prunable_parameters(conv), 0.1)
    # |w| >= 0.1 zeroes only 0.05 of the first filter and 0.0 of the second
    assert masks["weight"][:, 0].tolist() == [[[True, True], [False, True]], [[False, True], [True, True]]]


def test_global_threshold_two_layers():
    model = hand_model()
    params = prunable_parameters(model)
    threshold = global_threshold(params, 0.5)
    # half of 12 weights is 6: 0.01 ... 0.2 go, so the smallest kept magnitude 0.25 is the threshold
    assert threshold == 0.25
    apply_masks(model, magnitude_masks(params, threshold))
    # zeroed: 0.1, 0.05, -0.2 in the first layer, and -0.01, 0.15, 0.02 in the second
    assert model[0].weight.tolist() == [[0.0, -0.5], [pytest.approx(0.3), 0.0], [0.0, pytest.approx(0.4)]]
    assert model[2].weight.tolist() == [[pytest.approx(0.6), 0.0, 0.25], [pytest.approx(-0.35), 0.0, 0.0]]


def test_global_threshold_zero_sparsity_keeps_all():
    params = prunable_parameters(hand_model())
    assert global_threshold(params, 0.0) == 0.0
    masks = magnitude_masks(params, global_threshold(params, 0.0))
    assert all(mask.all() for mask in masks.values())


def test_global_threshold_ties_closest_count():
    tied = {"w": torch.tensor([0.5, -0.5, 0.5, 0.5, 1.0, 2.0])}
    # target 3 of 6: keeping the four 0.5s zeroes 0 (3 off), zeroing them zeroes 4 (1 off)
    assert global_threshold(tied, 0.5) == 1.0


def test_global_threshold_ties_equal_distance_keeps():
    tied = {"w": torch.tensor([0.1, 0.5, 0.5, 0.5, 0.5, 2.0])}
    # target 3 of 6: keeping the 0.5s zeroes 1 and zeroing them zeroes 5, both 2 off, so they stay
    assert global_threshold(tied, 0.5) == 0.5


def test_global_threshold_all_tied_at_maximum():
    tied = {"w": torch.ones(4)}
    threshold = global_threshold(tied, 0.9)
    # target round(3.6) = 4 of 4: the threshold must lie just above 1.0 to zero them all
    assert threshold > 1.0
    assert not magnitude_masks(tied, threshold)["w"].any()


# Prunable set: what is excluded


def test_prunable_parameters_exclusions():
    model = TinyNet()
    assert set(prunable_parameters(model)) == {"body.weight", "mix.weight"}
    with_norm = prunable_parameters(model, include_norm=True)
    assert set(with_norm) == {"body.weight", "mix.weight", "norm.weight", "mix_norm.weight"}
    with_output = prunable_parameters(model, include_output=True)
    assert set(with_output) == {"body.weight", "mix.weight", "classifier.weight"}


def test_excluded_parameters_stay_untouched():
    torch.manual_seed(0)
    model = TinyNet()
    with torch.no_grad():
        for param in model.parameters():
            param.uniform_(-1.0, 1.0)
    before = copy.deepcopy(model.state_dict())
    prune_by_magnitude(model, 0.9)
    after = model.state_dict()
    for key in ("body.bias", "norm.weight", "norm.bias", "mix.bias", "mix_norm.weight", "classifier.weight"):
        assert torch.equal(after[key], before[key]), key
    assert int((after["body.weight"] == 0).sum()) > 0


def test_student_prunable_set():
    names = set(prunable_parameters(build_student(BABY.model, num_classes=3)))
    # 16 Swin blocks x (qkv, proj, fc1, fc2) + 4 gates x 2 + 3 patch mergings + patch embedding
    # + 6 Compressor layers + 3 decoder convs = 64 + 8 + 3 + 1 + 6 + 3
    assert len(names) == 85
    assert "stages.0.0.path_a.0.mlp.fc1.weight" in names
    assert "compressor.conv_stream.0.weight" in names
    assert "patch_embed.proj.weight" in names
    assert "classifier.weight" not in names
    assert "decoder.fuse.0.1.weight" not in names  # BatchNorm
    assert "stage_norms.0.weight" not in names  # LayerNorm
    assert not any("relative_position_bias_table" in name for name in names)
    assert not any(name.endswith(".bias") for name in names)


def test_teacher_segmentation_head_excluded():
    teacher = build_teacher(BABY.model, num_classes=3)
    assert not any("segmentation_head" in name for name in prunable_parameters(teacher))
    assert "net.segmentation_head.0.weight" in prunable_parameters(teacher, include_output=True)


# Masks during fine-tuning, summaries, files


def train_steps(model: nn.Module, masks: dict[str, torch.Tensor] | None, steps: int = 5) -> None:
    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)
    for _ in range(steps):
        inputs = torch.randn(16, 2, generator=generator)
        targets = torch.randn(16, 2, generator=generator)
        optimizer.zero_grad()
        F.mse_loss(model(inputs), targets).backward()
        optimizer.step()
        if masks is not None:
            enforce_masks(model, masks)


def test_enforce_masks_keeps_zeros_under_adamw():
    model = hand_model()
    masks = prune_by_magnitude(model, 0.5)
    unenforced = copy.deepcopy(model)

    train_steps(model, masks)
    train_steps(unenforced, None)

    for name, param in model.named_parameters():
        if name in masks:
            assert torch.all(param[~masks[name]] == 0), name
    revived = sum(int(torch.count_nonzero(p[~masks[n]])) for n, p in unenforced.named_parameters() if n in masks)
    assert revived > 0, "without enforce_masks AdamW should move some pruned weights off zero"


def test_sparsity_summary_exact():
    model = hand_model()
    masks = prune_by_magnitude(model, 0.5)
    summary = sparsity_summary(model, masks)
    assert summary["total_parameters"] == 17  # 2*3 + 3 + 3*2 + 2
    assert summary["prunable_parameters"] == 12  # the two weight matrices
    assert summary["zeroed_prunable_parameters"] == 6  # the six smallest magnitudes
    assert summary["nonzero_parameters"] == 9  # 17 - 6 pruned - 2 biases set to 0
    assert summary["prunable_sparsity"] == 0.5
    assert summary["model_sparsity"] == pytest.approx(8 / 17)
    assert sparsity_summary(model) == summary  # no masks: the same default prunable set


def test_baby_student_magnitude_sparsity():
    model = baby_student()
    masks = prune_by_magnitude(model, 0.5)
    summary = sparsity_summary(model, masks)
    assert abs(summary["prunable_sparsity"] - 0.5) <= 0.01, summary


def test_masks_round_trip(tmp_path):
    masks = prune_by_magnitude(baby_student(), 0.5)
    path = save_masks(masks, tmp_path / "masks.safetensors")
    loaded = load_masks(path)
    assert set(loaded) == set(masks)
    for name, mask in masks.items():
        assert loaded[name].dtype == torch.bool
        assert torch.equal(loaded[name], mask), name


def test_load_masks_rejects_other_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_masks(tmp_path / "missing.safetensors")
    save_file({"weight": torch.ones(2)}, str(tmp_path / "floats.safetensors"))
    with pytest.raises(ValueError, match="must be stored as uint8"):
        load_masks(tmp_path / "floats.safetensors")


# Structured pruning of the baby student


def test_structured_pruning_reduces_parameters():
    model = baby_student()
    summary = prune_student_structured(model, 0.5)
    assert summary["parameters_before"] == 842667
    # MLPs: halving hidden h of width d removes d*h + h/2 per Swin block, 4 blocks per stage:
    # 4 * (528 + 2080 + 8256 + 32896) = 175040. Decoder: fuse convs 27648 + 5760 + 2880,
    # BatchNorms 32 + 16 + 16, classifier 24: 36376. Total 211416.
    assert summary["parameters_before"] - summary["parameters_after"] == 211416
    assert summary["layers"]["stages.3.1.path_b.1.mlp"] == {"kept": 128, "total": 256}
    assert summary["layers"]["decoder.fuse.0"] == {"kept": 16, "total": 32}
    assert model.feature_channels["decoder"] == 8


@pytest.mark.parametrize("size", [(64, 64), (61, 75)])
def test_structured_pruned_forward_backward(size):
    model = baby_student()
    prune_student_structured(model, 0.5)
    model.train()
    x = torch.randn(2, 3, *size)
    logits = model(x)
    assert logits.shape == (2, 3, *size)
    assert torch.isfinite(logits).all()
    logits.square().mean().backward()
    fc1 = model.stages[0][0].path_a[0].mlp.fc1
    assert fc1.weight.grad is not None and torch.isfinite(fc1.weight.grad).all()
    assert model.classifier.weight.grad is not None


def zero_odd_units(model: nn.Module) -> None:
    """Silence every odd MLP hidden unit and decoder channel so it adds nothing to the output."""
    with torch.no_grad():
        for block in model.modules():
            if isinstance(block, SwinTransformerBlock):
                block.mlp.fc1.weight[1::2] = 0.0
                block.mlp.fc1.bias[1::2] = 0.0  # GELU(0) = 0
                block.mlp.fc2.weight[:, 1::2] = 0.0
        for fuse in model.decoder.fuse:
            conv, norm = fuse[0], fuse[1]
            conv.weight[1::2] = 0.0
            norm.running_mean[1::2] = 0.0  # BatchNorm maps the zero map to its bias, 0
            norm.bias[1::2] = 0.0


def test_structured_pruning_removes_silent_units_only():
    model = baby_student()
    zero_odd_units(model)
    original_fc1 = model.stages[2][1].path_a[1].mlp.fc1.weight.clone()
    x = torch.randn(1, 3, 61, 75)
    with torch.no_grad():
        expected = model(x)

    prune_student_structured(model, 0.5)

    assert torch.equal(model.stages[2][1].path_a[1].mlp.fc1.weight, original_fc1[0::2])
    with torch.no_grad():
        actual = model(x)
    max_difference = (expected - actual).abs().max().item()
    assert torch.allclose(expected, actual, rtol=1e-4, atol=1e-5), (
        f"pruning silent units changed the outputs: max absolute difference {max_difference:.3g}"
    )


# Golden reloads through checkpoint folders


def test_golden_reload_structured(tmp_path):
    model = baby_student()
    summary = prune_student_structured(model, 0.5)
    meta = describe_model(BABY, "student")
    meta["pruned_shapes"] = parameter_shapes(model)
    meta["pruning"] = summary
    save_checkpoint(tmp_path, model, meta)

    loaded, loaded_meta = load_model(tmp_path)
    x = torch.randn(2, 3, 61, 75, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_identical(model(x), loaded(x))
    assert loaded.feature_channels == model.feature_channels
    assert loaded_meta["pruning"]["parameters_after"] == summary["parameters_after"]


def test_golden_reload_magnitude(tmp_path):
    model = baby_student()
    masks = prune_by_magnitude(model, 0.5)
    meta = describe_model(BABY, "student")
    meta["pruning"] = {"kind": "magnitude", "sparsity": 0.5}
    save_checkpoint(tmp_path, model, meta)

    loaded, _ = load_model(tmp_path)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_identical(model(x), loaded(x))
    assert sparsity_summary(loaded, masks) == sparsity_summary(model, masks)


def test_save_rejects_stale_pruned_shapes(tmp_path):
    model = baby_student()
    meta = describe_model(BABY, "student")
    meta["pruned_shapes"] = parameter_shapes(model)  # taken before pruning
    prune_student_structured(model, 0.5)
    with pytest.raises(ValueError, match="does not match the model being saved"):
        save_checkpoint(tmp_path, model, meta)


def test_load_pruned_without_shapes_explains(tmp_path):
    model = baby_student()
    prune_student_structured(model, 0.5)
    save_checkpoint(tmp_path, model, describe_model(BABY, "student"))
    with pytest.raises(ValueError, match="pruned_shapes"):
        load_model(tmp_path)


# Bad input


def test_masks_for_other_model_rejected():
    masks = prune_by_magnitude(hand_model(), 0.5)
    with pytest.raises(ValueError, match="'0.weight' names no parameter"):
        apply_masks(baby_student(), masks)


def test_masks_of_other_shapes_rejected():
    model = baby_student()
    masks = magnitude_masks(prunable_parameters(model), 0.1)
    prune_student_structured(model, 0.5)
    with pytest.raises(ValueError, match="must have the parameter's shape"):
        enforce_masks(model, masks)


def test_non_bool_masks_rejected():
    model = hand_model()
    with pytest.raises(ValueError, match="'0.weight' must be a bool tensor, got torch.float32"):
        apply_masks(model, {"0.weight": torch.ones(3, 2)})


@pytest.mark.parametrize("keep_ratio", [0.0, -0.1, 1.5, math.nan])
def test_bad_keep_ratio(keep_ratio):
    with pytest.raises(ValueError, match=f"keep_ratio must be a number in \\(0, 1\\].*got {keep_ratio!r}"):
        prune_student_structured(baby_student(), keep_ratio)


def test_structured_pruning_needs_student():
    with pytest.raises(TypeError, match="needs a CerviSegNet, got Sequential"):
        prune_student_structured(hand_model(), 0.5)


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5, math.nan])
def test_bad_sparsity(sparsity):
    params = prunable_parameters(hand_model())
    with pytest.raises(ValueError, match=f"sparsity must be a number in \\[0, 1\\).*got {sparsity!r}"):
        global_threshold(params, sparsity)


def test_reshape_unknown_module_type():
    model = build_student(BABY.model, num_classes=3)
    shapes = parameter_shapes(model)
    key = "stages.0.0.path_a.0.attn.relative_position_bias_table"
    shapes[key] = [50, 1]
    with pytest.raises(ValueError, match=rf"{key} from \[49, 1\] to saved shape \[50, 1\].*WindowAttention"):
        reshape_to(model, shapes)


def test_reshape_shapes_of_other_model():
    with pytest.raises(ValueError, match="shapes do not describe this"):
        reshape_to(build_student(BABY.model, num_classes=3), parameter_shapes(hand_model()))


def test_reshape_inconsistent_shapes():
    model = hand_model()
    shapes = parameter_shapes(model)
    shapes["0.weight"] = [5, 2]  # five output units, but the bias still has three
    with pytest.raises(ValueError, match="do not fit one layer"):
        reshape_to(model, shapes)
