"""Test-time augmentation (TTA) over the eight symmetries of the square.

Each view is the input under one rotation or reflection. `predict_with_tta` runs the views
through the model, maps each view's softmax probabilities back to the input orientation with
the exact inverse transform, checks them for NaN and inf, and averages them.

Shapes: B images, C input channels, K classes, V views, H x W pixels. Inside one group of
same-shape views, V_g is the group's view count and h x w the view size.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor, nn

# Rotations are counterclockwise as the image is displayed (row 0 at the top), the direction of
# torch.rot90 with dims=(-2, -1). hflip mirrors left-right (reverses W) and vflip mirrors
# top-bottom (reverses H). transpose reflects across the main diagonal, antitranspose across the
# anti-diagonal.
TTATransform = Literal[
    "identity", "rot90", "rot180", "rot270", "hflip", "vflip", "transpose", "antitranspose"
]

ALL_TRANSFORMS: tuple[TTATransform, ...] = get_args(TTATransform)
FLIP_TRANSFORMS: tuple[TTATransform, ...] = ("identity", "hflip", "vflip")

# Rotations by 90 and 270 degrees undo each other. Every other transform is its own inverse.
_INVERSES: dict[TTATransform, TTATransform] = {
    "identity": "identity",
    "rot90": "rot270",
    "rot180": "rot180",
    "rot270": "rot90",
    "hflip": "hflip",
    "vflip": "vflip",
    "transpose": "transpose",
    "antitranspose": "antitranspose",
}

# Transforms that turn an (H, W) image into a (W, H) view.
_SWAPS_HEIGHT_AND_WIDTH = frozenset({"rot90", "rot270", "transpose", "antitranspose"})


@dataclass
class TTAResult:
    """Averaged TTA prediction, in the orientation of the input images."""

    probs: Tensor  # (B, K, H, W) mean softmax probability over the V views
    disagreement: Tensor  # (B, H, W) fraction of views whose argmax differs from labels, in [0, 1]
    labels: Tensor  # (B, H, W) int64 argmax of probs


def _check_transform_name(name: object) -> None:
    if not isinstance(name, str) or name not in ALL_TRANSFORMS:
        raise ValueError(f"TTA transform must be one of {', '.join(ALL_TRANSFORMS)}, got {name!r}")


def validate_transforms(transforms: Sequence[str]) -> tuple[TTATransform, ...]:
    """Validate a sequence of TTA transform names and return it as a tuple.

    Raises ValueError, listing the allowed names, for a bare string, an empty sequence, an
    unknown name or a repeated name. Raises TypeError when `transforms` is not iterable.
    """
    allowed = ", ".join(ALL_TRANSFORMS)
    if isinstance(transforms, str):
        raise ValueError(
            f"transforms must be a sequence of names such as [{transforms!r}], got the string "
            f"{transforms!r}. Allowed names: {allowed}"
        )
    names = tuple(transforms)
    if not names:
        raise ValueError(
            f"transforms must contain at least one name, got an empty sequence. Pass ['identity'] "
            f"for a prediction without augmentation, or choose from: {allowed}"
        )
    for name in names:
        _check_transform_name(name)

    # A repeated view would carry double weight in the average.
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(
            f"transforms must not repeat a name, got {list(names)} with {repeated} repeated. "
            f"Remove the repeats; allowed names: {allowed}"
        )
    return names


def apply_transform(x: Tensor, name: TTATransform) -> Tensor:
    """Apply one symmetry of the square to the last two dimensions (..., H, W) of `x`.

    rot90, rot270, transpose and antitranspose return (..., W, H). The result may share memory
    with `x`, because identity returns `x` itself and transpose returns a view.
    """
    _check_transform_name(name)
    if x.dim() < 2:
        raise ValueError(
            f"x must have at least 2 dimensions (..., H, W), got shape {tuple(x.shape)}"
        )

    if name == "identity":
        return x
    if name == "rot90":
        return torch.rot90(x, 1, dims=(-2, -1))
    if name == "rot180":
        return torch.rot90(x, 2, dims=(-2, -1))
    if name == "rot270":
        return torch.rot90(x, 3, dims=(-2, -1))
    if name == "hflip":
        return x.flip(-1)
    if name == "vflip":
        return x.flip(-2)
    if name == "transpose":
        return x.transpose(-2, -1)
    # antitranspose: rotate by 180 degrees, then transpose, so out[..., i, j] = x[..., H-1-j, W-1-i]
    return x.flip(-2, -1).transpose(-2, -1)


def invert_transform(y: Tensor, name: TTATransform) -> Tensor:
    """Undo `apply_transform(x, name)`, so that invert_transform(apply_transform(x, t), t) == x.

    `y` is (..., H', W') in the view's orientation, and the result is in the input's orientation.
    """
    _check_transform_name(name)
    return apply_transform(y, _INVERSES[name])


def _check_images(images: object) -> None:
    if not isinstance(images, Tensor):
        raise ValueError(
            f"images must be a torch.Tensor of shape (B, C, H, W), got {type(images).__name__}"
        )
    if images.dim() != 4:
        raise ValueError(
            f"images must have shape (B, C, H, W), got shape {tuple(images.shape)}. Add a batch "
            f"dimension with images.unsqueeze(0) for a single image"
        )
    if not images.is_floating_point():
        raise ValueError(
            f"images must be a floating-point tensor, got dtype {images.dtype}. Convert and "
            f"normalise the images as for training before calling predict_with_tta"
        )
    batch_size, _, height, width = images.shape
    if batch_size == 0 or height == 0 or width == 0:
        raise ValueError(
            f"images must contain at least one image with at least one pixel, got shape "
            f"{tuple(images.shape)}"
        )
    non_finite = int((~torch.isfinite(images)).sum())
    if non_finite:
        raise ValueError(
            f"images must be finite, got {non_finite} NaN or inf values. Fix the input, for "
            f"example a division by a zero standard deviation in the normalisation"
        )


def _check_max_batch(max_batch: object) -> None:
    if max_batch is None:
        return
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(
            f"max_batch must be a positive integer or None, got {max_batch!r}. Pass None to run "
            f"all views of one shape in a single forward"
        )


def _group_by_view_shape(
    names: Sequence[TTATransform], height: int, width: int
) -> list[tuple[tuple[int, int], list[TTATransform]]]:
    """Group transform names by the (H, W) of the views they produce, in first-seen order."""
    groups: dict[tuple[int, int], list[TTATransform]] = {}
    for name in names:
        shape = (width, height) if name in _SWAPS_HEIGHT_AND_WIDTH else (height, width)
        groups.setdefault(shape, []).append(name)
    return list(groups.items())


def _is_logits_for(output: object, batch: Tensor) -> bool:
    """Check whether `output` is an (N, K, H, W) tensor with the N, H and W of `batch`."""
    if not isinstance(output, Tensor) or output.dim() != 4:
        return False
    return output.shape[0] == batch.shape[0] and output.shape[-2:] == batch.shape[-2:]


def _run_model(model: nn.Module, batch: Tensor, max_batch: int | None) -> Tensor:
    """Run `model` on (N, C, H, W) in chunks of at most `max_batch` images.

    Returns the concatenated (N, K, H, W) logits and raises ValueError for any other output.
    """
    chunks = [batch] if max_batch is None else list(batch.split(max_batch))
    outputs = []
    for chunk in chunks:
        logits = model(chunk)
        if not _is_logits_for(logits, chunk):
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(
                f"model must return (N, K, H, W) logits at the size of its input, got {got} for "
                f"an input of shape {tuple(chunk.shape)}. Wrap the model so that its forward "
                f"returns only the logits, upsampled to the input size"
            )
        outputs.append(logits)
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def _raise_non_finite(names: Sequence[TTATransform], finite: Sequence[bool]) -> None:
    bad = [name for name, ok in zip(names, finite) if not ok]
    good = [name for name, ok in zip(names, finite) if ok]
    if not good:
        raise ValueError(
            f"model output contains NaN or inf for every TTA view ({', '.join(bad)}), although "
            f"the images are finite. Check the model weights for NaN or inf (a diverged "
            f"checkpoint) and that the images are normalised as in training"
        )
    raise ValueError(
        f"model output contains NaN or inf for the TTA views {', '.join(bad)} but not for "
        f"{', '.join(good)}. Check the model weights and the input normalisation, or leave "
        f"{', '.join(bad)} out of transforms"
    )


@torch.no_grad()
def predict_with_tta(
    model: nn.Module,
    images: Tensor,
    transforms: Sequence[TTATransform] = ALL_TRANSFORMS,
    max_batch: int | None = None,
) -> TTAResult:
    """Predict `images` (B, C, H, W) under each transform and average the probabilities.

    The model takes (N, C, H, W) float tensors on its device and must return (N, K, H, W)
    logits of the same H and W. Views of one shape run in one forward, (V * B, C, H, W), so a
    square batch needs one forward and a non-square one needs two, because rot90, rot270,
    transpose and antitranspose give (W, H) views. `max_batch` caps the images per forward
    after this expansion. The model's train or eval mode is left unchanged, so call
    model.eval() first.

    The function keeps the probabilities of all V views in memory at once, V * B * K * H * W
    values in float32 (float64 for float64 logits), whatever `max_batch` is.

    Raises ValueError for invalid arguments, for a model output of the wrong shape and when any
    view's probabilities contain NaN or inf, naming those views.
    """
    names = validate_transforms(transforms)
    _check_images(images)
    _check_max_batch(max_batch)
    _, _, height, width = images.shape

    # Transform, predict and inverse-transform, one forward per group of same-shape views.
    probs_by_view: dict[TTATransform, Tensor] = {}
    for _, group in _group_by_view_shape(names, height, width):
        views = torch.cat([apply_transform(images, name) for name in group])  # (V_g * B, C, h, w)
        logits = _run_model(model, views, max_batch)  # (V_g * B, K, h, w), view-major
        # Softmax in at least float32 so that half-precision logits are averaged accurately.
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        view_probs = logits.softmax(dim=1).unflatten(0, (len(group), -1))  # (V_g, B, K, h, w)
        for index, name in enumerate(group):
            probs_by_view[name] = invert_transform(view_probs[index], name)  # (B, K, H, W)
    stacked = torch.stack([probs_by_view[name] for name in names])  # (V, B, K, H, W)

    # Check for NaN or inf before averaging, so that the error can name the views.
    finite = torch.isfinite(stacked).flatten(1).all(dim=1)  # (V,)
    if not bool(finite.all()):
        _raise_non_finite(names, finite.tolist())

    # Average, then count the views that vote against the averaged label.
    probs = stacked.mean(dim=0)  # (B, K, H, W)
    labels = probs.argmax(dim=1)  # (B, H, W)
    view_labels = stacked.argmax(dim=2)  # (V, B, H, W)
    disagreement = (view_labels != labels).to(probs.dtype).mean(dim=0)  # (B, H, W)
    return TTAResult(probs=probs, disagreement=disagreement, labels=labels)
