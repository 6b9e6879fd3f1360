"""Test-time augmentation with oracle models whose exact output is known."""

import itertools

import pytest
import torch
from torch import nn

from cervi_ray.tta import (
    ALL_TRANSFORMS,
    FLIP_TRANSFORMS,
    TTAResult,
    apply_transform,
    invert_transform,
    predict_with_tta,
    validate_transforms,
)

SWAPPING = ("rot90", "rot270", "transpose", "antitranspose")
NOT_SWAPPING = ("identity", "rot180", "hflip", "vflip")
SHAPES = [(2, 3, 6, 6), (2, 3, 5, 7)]  # (B, C, H, W): square and non-square


class EquivariantOracle(nn.Module):
    """Logits from the pixel's own first channel only: logits[:, k] = x[:, 0] * (k + 1).

    Every view therefore gives the same probabilities after the inverse transform.
    """

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scales = torch.arange(1, self.num_classes + 1, dtype=x.dtype)
        return x[:, :1] * scales[None, :, None, None]  # (B, K, H, W)


class PositionOracle(nn.Module):
    """Logits from a fixed coordinate ramp, independent of the input content.

    The ramp 0.3 * row + 0.1 * col is not symmetric under any of the seven non-identity
    transforms, so each view maps back to a different probability map.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_size, _, height, width = x.shape
        rows = torch.arange(height, dtype=x.dtype)[:, None]
        cols = torch.arange(width, dtype=x.dtype)[None, :]
        ramp = 0.3 * rows + 0.1 * cols  # (H, W)
        class_weights = torch.tensor([-1.0, 0.0, 1.0], dtype=x.dtype)
        logits = class_weights[:, None, None] * ramp  # (K, H, W)
        return logits.expand(batch_size, -1, -1, -1)  # (B, K, H, W)


class TopLeftOracle(nn.Module):
    """Class 0 everywhere except class 1 at the view's top-left pixel, whatever the input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_size, _, height, width = x.shape
        logits = torch.zeros(batch_size, 3, height, width, dtype=x.dtype)
        logits[:, 0] = 2.0
        logits[:, 0, 0, 0] = 0.0
        logits[:, 1, 0, 0] = 2.0
        return logits


class CountingModel(nn.Module):
    """Wrap a model and record the input shape of every forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.input_shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.input_shapes.append(tuple(x.shape))
        return self.model(x)


class NaNModel(nn.Module):
    """NaN logits everywhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 3, x.shape[2], x.shape[3]), float("nan"))


class TallViewNaNModel(nn.Module):
    """NaN logits only for views taller than wide, finite equivariant logits otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = EquivariantOracle()(x)
        if x.shape[2] > x.shape[3]:
            logits = logits * float("nan")
        return logits


def hand_tta(model: nn.Module, images: torch.Tensor, name: str) -> torch.Tensor:
    """Compute one view's probabilities by hand: transform, predict, softmax, inverse transform."""
    view_logits = model(apply_transform(images, name))
    return invert_transform(view_logits.softmax(dim=1), name)


# --- transforms ---


@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 5, 7)])
@pytest.mark.parametrize("name", ALL_TRANSFORMS)
def test_invert_undoes_apply(name, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    y = apply_transform(x, name)
    height, width = shape[-2:]
    expected_view_size = (width, height) if name in SWAPPING else (height, width)
    assert tuple(y.shape[-2:]) == expected_view_size
    assert tuple(y.shape[:-2]) == tuple(shape[:-2])
    assert torch.equal(invert_transform(y, name), x)


HAND_CASES = {
    # identity: unchanged
    "identity": [[0, 1, 2], [3, 4, 5]],
    # rot90, counterclockwise: the right column (2, 5) becomes the top row
    "rot90": [[2, 5], [1, 4], [0, 3]],
    # rot180: both axes reversed
    "rot180": [[5, 4, 3], [2, 1, 0]],
    # rot270, clockwise: the left column read upward (3, 0) becomes the top row
    "rot270": [[3, 0], [4, 1], [5, 2]],
    # hflip: each row reversed
    "hflip": [[2, 1, 0], [5, 4, 3]],
    # vflip: the two rows swapped
    "vflip": [[3, 4, 5], [0, 1, 2]],
    # transpose: rows become columns
    "transpose": [[0, 3], [1, 4], [2, 5]],
    # antitranspose: out[i, j] = x[1 - j, 2 - i], a reflection across the anti-diagonal
    "antitranspose": [[5, 2], [4, 1], [3, 0]],
}


@pytest.mark.parametrize("name", ALL_TRANSFORMS)
def test_apply_matches_hand_example(name):
    x = torch.tensor([[0, 1, 2], [3, 4, 5]])
    assert apply_transform(x, name).tolist() == HAND_CASES[name]


def test_hand_examples_cover_all_transforms():
    assert tuple(HAND_CASES) == ALL_TRANSFORMS


def test_transforms_of_square_are_distinct():
    x = torch.arange(16).reshape(4, 4)
    results = [apply_transform(x, name) for name in ALL_TRANSFORMS]
    for (first, a), (second, b) in itertools.combinations(zip(ALL_TRANSFORMS, results), 2):
        assert not torch.equal(a, b), f"{first} and {second} give the same square"


def test_composition_stays_in_group():
    x = torch.arange(16).reshape(4, 4)
    results = [apply_transform(x, name) for name in ALL_TRANSFORMS]
    for first, second in itertools.product(ALL_TRANSFORMS, repeat=2):
        composed = apply_transform(apply_transform(x, first), second)
        matches = [torch.equal(composed, result) for result in results]
        assert sum(matches) == 1, f"{first} then {second} is not one of the 8 transforms"


def test_flip_transforms_are_subset():
    assert FLIP_TRANSFORMS == ("identity", "hflip", "vflip")
    assert set(FLIP_TRANSFORMS) <= set(ALL_TRANSFORMS)


@pytest.mark.parametrize("function", [apply_transform, invert_transform])
def test_transform_rejects_unknown_name(function):
    with pytest.raises(ValueError, match=r"must be one of identity, rot90.*got 'rot45'"):
        function(torch.zeros(2, 2), "rot45")


def test_apply_rejects_one_dimensional_input():
    with pytest.raises(ValueError, match=r"at least 2 dimensions .*got shape \(5,\)"):
        apply_transform(torch.zeros(5), "hflip")


# --- validate_transforms ---


def test_validate_returns_tuple():
    assert validate_transforms(["rot90", "identity"]) == ("rot90", "identity")
    assert validate_transforms(ALL_TRANSFORMS) == ALL_TRANSFORMS


@pytest.mark.parametrize(
    "transforms, bad_value",
    [
        (["identity", "rot45"], "'rot45'"),  # unknown name
        (["identity", 90], "90"),  # not a string
        (["Identity"], "'Identity'"),  # names are case-sensitive
        ([], "empty"),
        ("hflip", "'hflip'"),  # a bare string, not a list of names
        (["hflip", "identity", "hflip"], "['hflip']"),  # repeated name
    ],
)
def test_validate_rejects_bad_transforms(transforms, bad_value):
    with pytest.raises(ValueError) as excinfo:
        validate_transforms(transforms)
    message = str(excinfo.value)
    assert bad_value in message
    for name in ALL_TRANSFORMS:
        assert name in message


def test_predict_rejects_bad_transforms():
    images = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="got an empty sequence"):
        predict_with_tta(EquivariantOracle(), images, transforms=[])
    with pytest.raises(ValueError, match="got 'rot45'"):
        predict_with_tta(EquivariantOracle(), images, transforms=["rot45"])


# --- predict_with_tta with oracle models ---


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "transforms", [ALL_TRANSFORMS, FLIP_TRANSFORMS, ("identity",), ("rot90", "antitranspose")]
)
def test_equivariant_oracle_matches_single_view(transforms, shape):
    model = EquivariantOracle()
    images = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    expected = model(images).softmax(dim=1)

    result = predict_with_tta(model, images, transforms=transforms)

    assert isinstance(result, TTAResult)
    torch.testing.assert_close(result.probs, expected)
    assert torch.equal(result.disagreement, torch.zeros(shape[0], *shape[2:]))
    assert torch.equal(result.labels, expected.argmax(dim=1))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ALL_TRANSFORMS)
def test_position_oracle_single_view(name, shape):
    model = PositionOracle()
    images = torch.randn(shape, generator=torch.Generator().manual_seed(2))

    result = predict_with_tta(model, images, transforms=[name])
    identity = predict_with_tta(model, images, transforms=["identity"])

    torch.testing.assert_close(result.probs, hand_tta(model, images, name))
    # Check the inverse without invert_transform: transforming the result again must give the
    # view's own probabilities.
    view_probs = model(apply_transform(images, name)).softmax(dim=1)
    torch.testing.assert_close(apply_transform(result.probs, name), view_probs)
    assert torch.equal(result.labels, result.probs.argmax(dim=1))
    # one view can never disagree with itself
    assert torch.equal(result.disagreement, torch.zeros(shape[0], *shape[2:]))
    if name != "identity":
        assert not torch.allclose(result.probs, identity.probs), f"{name} matches identity"


@pytest.mark.parametrize("shape", SHAPES)
def test_position_oracle_averages_all_views(shape):
    model = PositionOracle()
    images = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    per_view = [hand_tta(model, images, name) for name in ALL_TRANSFORMS]
    per_view = torch.stack(per_view)  # (V, B, K, H, W)
    expected = per_view.mean(dim=0)

    result = predict_with_tta(model, images)

    torch.testing.assert_close(result.probs, expected)
    assert torch.equal(result.labels, expected.argmax(dim=1))
    expected_disagreement = (per_view.argmax(dim=2) != expected.argmax(dim=1)).float().mean(dim=0)
    torch.testing.assert_close(result.disagreement, expected_disagreement)


@pytest.mark.parametrize("height, width", [(4, 4), (3, 5)])
def test_two_of_eight_views_disagree(height, width):
    # Each view marks its own top-left pixel as class 1. Mapped back, every corner of the input
    # receives that mark from exactly 2 of the 8 views (the top-left corner from identity and
    # transpose). So the corners have disagreement 2 / 8, and all other pixels have 0.
    result = predict_with_tta(TopLeftOracle(), torch.zeros(1, 3, height, width))

    expected_disagreement = torch.zeros(1, height, width)
    for row, col in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:
        expected_disagreement[0, row, col] = 0.25
    assert torch.equal(result.disagreement, expected_disagreement)
    assert torch.equal(result.labels, torch.zeros(1, height, width, dtype=torch.int64))

    # corner probabilities: 6 views vote softmax([2, 0, 0]) and 2 vote softmax([0, 2, 0])
    class_0 = torch.tensor([2.0, 0.0, 0.0]).softmax(dim=0)
    class_1 = torch.tensor([0.0, 2.0, 0.0]).softmax(dim=0)
    torch.testing.assert_close(result.probs[0, :, 0, 0], 0.75 * class_0 + 0.25 * class_1)
    torch.testing.assert_close(result.probs[0, :, 1, 1], class_0)


def test_result_dtypes_and_shapes():
    result = predict_with_tta(PositionOracle(), torch.randn(2, 3, 5, 7))
    assert result.probs.shape == (2, 3, 5, 7)
    assert result.probs.dtype == torch.float32
    assert result.labels.shape == (2, 5, 7)
    assert result.labels.dtype == torch.int64
    assert result.disagreement.shape == (2, 5, 7)
    assert bool(((result.disagreement >= 0) & (result.disagreement <= 1)).all())
    torch.testing.assert_close(result.probs.sum(dim=1), torch.ones(2, 5, 7))


def test_half_precision_logits_average_in_float32():
    images = torch.randn(1, 3, 4, 4)
    result = predict_with_tta(EquivariantOracle(), images.half())
    assert result.probs.dtype == torch.float32


# --- batching ---


def test_max_batch_one_matches_single_forward():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1))
    model.eval()
    images = torch.randn(2, 3, 5, 7)

    chunked = predict_with_tta(model, images, max_batch=1)
    single = predict_with_tta(model, images, max_batch=None)

    torch.testing.assert_close(chunked.probs, single.probs)
    torch.testing.assert_close(chunked.disagreement, single.disagreement)
    assert torch.equal(chunked.labels, single.labels)


def test_square_batch_runs_one_forward():
    model = CountingModel(EquivariantOracle())
    predict_with_tta(model, torch.randn(2, 3, 6, 6))
    # 8 views of 2 images each, concatenated along the batch dimension
    assert model.input_shapes == [(16, 3, 6, 6)]


def test_non_square_batch_runs_one_forward_per_shape():
    model = CountingModel(EquivariantOracle())
    predict_with_tta(model, torch.randn(2, 3, 5, 7))
    # identity, rot180, hflip and vflip keep (5, 7); the other 4 views are (7, 5)
    assert model.input_shapes == [(8, 3, 5, 7), (8, 3, 7, 5)]


def test_max_batch_caps_forward_size():
    model = CountingModel(EquivariantOracle())
    predict_with_tta(model, torch.randn(2, 3, 5, 7), max_batch=3)
    # each shape group of 4 views x 2 images = 8 is split into 3 + 3 + 2
    assert [shape[0] for shape in model.input_shapes] == [3, 3, 2, 3, 3, 2]
    assert [shape[2:] for shape in model.input_shapes] == [(5, 7)] * 3 + [(7, 5)] * 3


def test_max_batch_above_view_count_runs_once():
    model = CountingModel(EquivariantOracle())
    predict_with_tta(model, torch.randn(2, 3, 6, 6), transforms=FLIP_TRANSFORMS, max_batch=100)
    assert model.input_shapes == [(6, 3, 6, 6)]


@pytest.mark.parametrize("max_batch", [0, -1, 2.5, True, "4"])
def test_rejects_bad_max_batch(max_batch):
    with pytest.raises(ValueError, match=r"max_batch must be a positive integer or None, got"):
        predict_with_tta(EquivariantOracle(), torch.randn(1, 3, 4, 4), max_batch=max_batch)


# --- model state and guards ---


def test_model_mode_and_grad_untouched():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    model.train()
    result = predict_with_tta(model, torch.randn(1, 3, 4, 4))
    assert all(module.training for module in model.modules())
    assert not result.probs.requires_grad


@pytest.mark.parametrize("fill", [float("nan"), float("inf")])
def test_non_finite_model_output_raises(fill):
    class FilledModel(nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 3, x.shape[2], x.shape[3]), fill)

    with pytest.raises(ValueError) as excinfo:
        predict_with_tta(FilledModel(), torch.randn(1, 3, 4, 4))
    message = str(excinfo.value)
    assert "NaN or inf for every TTA view" in message
    assert "model weights" in message
    assert "normalised" in message


def test_nan_model_raises_for_identity_only():
    with pytest.raises(ValueError, match=r"NaN or inf for every TTA view \(identity\)"):
        predict_with_tta(NaNModel(), torch.randn(1, 3, 4, 4), transforms=["identity"])


def test_non_finite_error_names_failing_views():
    # On a (5, 7) input only the 4 axis-swapping views are (7, 5), taller than wide.
    with pytest.raises(ValueError) as excinfo:
        predict_with_tta(TallViewNaNModel(), torch.randn(1, 3, 5, 7))
    message = str(excinfo.value)
    failing, _, finite = message.partition(" but not for ")
    for name in SWAPPING:
        assert name in failing
    for name in NOT_SWAPPING:
        assert name not in failing
        assert name in finite
    assert "leave rot90, rot270, transpose, antitranspose out of transforms" in message


def test_non_finite_images_raise():
    images = torch.randn(1, 3, 4, 4)
    images[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"images must be finite, got 1 NaN or inf values"):
        predict_with_tta(EquivariantOracle(), images)


@pytest.mark.parametrize(
    "images, expected",
    [
        (torch.randn(3, 4, 4), r"shape \(B, C, H, W\), got shape \(3, 4, 4\)"),
        (torch.zeros(1, 3, 4, 4, dtype=torch.uint8), r"floating-point tensor, got dtype torch\.uint8"),
        (torch.zeros(0, 3, 4, 4), r"at least one image .*got shape \(0, 3, 4, 4\)"),
        ([[0.0]], r"must be a torch.Tensor .*got list"),
    ],
)
def test_rejects_bad_images(images, expected):
    with pytest.raises(ValueError, match=expected):
        predict_with_tta(EquivariantOracle(), images)


def test_rejects_downsampling_model():
    model = nn.Conv2d(3, 3, kernel_size=2, stride=2)
    with pytest.raises(ValueError, match=r"logits at the size of its input, got \(8, 3, 2, 2\)"):
        predict_with_tta(model, torch.randn(1, 3, 4, 4))


def test_rejects_tuple_output():
    class FeatureModel(nn.Module):
        def forward(self, x):
            return x, {"features": x}

    with pytest.raises(ValueError, match=r"got tuple .*returns only the logits"):
        predict_with_tta(FeatureModel(), torch.randn(1, 3, 4, 4))
