"""ONNX export of segmentation models, with and without test-time augmentation, checked on ONNX Runtime.

Two graphs, both with input "image", float32 (N, 3, H, W), normalised as for training (see
preprocessing.json of a bundle), and dynamic N, H and W:
  model.onnx       output "logits", (N, K, H, W): the model's raw scores;
  model_tta.onnx   output "probs", (N, K, H, W): softmax probabilities averaged over the TTA
                   views, with each view's flip or rotation and its inverse inside the graph.

Exporter: torch's TorchScript-based exporter (torch.onnx.export(..., dynamo=False)), chosen by
measurement with torch 2.14.1 on a shared 2-core x86_64 CPU machine with other jobs running (so
the times are rough). For the baby student of configs/baby.yaml, the torch.export-based exporter
(dynamo=True) took 162 s and fixed the model's padding branch to the example's size, so the graph
failed on 100 x 70 inputs. With the padding moved in front of the model (PaddedModel) it had not
finished after 15 minutes. The TorchScript-based exporter took 11 s, and it records the shape
arithmetic of padding, window partition and cropping as graph operations. It still fixes every
Python `if` to the branch taken by the example input. So PaddedModel pads first, and every export
is checked against PyTorch at a second, odd size.
NOTE: torch has marked the TorchScript-based exporter deprecated since 2.9, so a later torch
release may remove it.

Shapes: N images, C input channels, K classes, V TTA views, H x W pixels.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cervi_ray.models.baselines import BaselineSegmenter
from cervi_ray.models.student import CerviSegNet
from cervi_ray.models.teacher import DeepLabV3PlusTeacher
from cervi_ray.tta import TTATransform, predict_with_tta, validate_transforms

logger = logging.getLogger(__name__)

MODEL_ONNX_FILE = "model.onnx"
TTA_ONNX_FILE = "model_tta.onnx"
INPUT_NAME = "image"
LOGITS_NAME = "logits"
PROBS_NAME = "probs"
EXPORTER = "torch.onnx.export(dynamo=False), the TorchScript-based exporter"
# Opset 17 is the first with a LayerNormalization operator. The TorchScript-based exporter of
# torch 2.14 goes up to 20, but a lower opset runs on more (older) runtimes.
OPSET_VERSION = 17
DYNAMIC_AXES = {0: "batch", 2: "height", 3: "width"}

# Agreement required between ONNX Runtime and PyTorch on the same inputs. The allowed max abs
# difference is MAX_ABS_DIFF times max(1, max |PyTorch output|), because float32 rounding grows
# with the size of the values. Measured with torch 2.14.1 and onnxruntime 1.32.0 on a 2-core
# x86_64 CPU: the baby student of configs/baby.yaml differs by about 3e-7 in logits and 1e-7 in
# TTA probabilities. A trained demo-profile teacher, with logits up to 10.6, differs by 5.4e-5.
MAX_ABS_DIFF = 1e-4
MIN_ARGMAX_AGREEMENT = 0.999

# Each TTA view as a sequence of flips and transposes of the last two dimensions. The
# TorchScript-based exporter has no ONNX conversion for torch.rot90, and each step here is its
# own inverse, so a view is undone by running its steps in reverse order. The views equal
# cervi_ray.tta.apply_transform exactly (tests/test_export.py checks all eight).
_VIEW_STEPS: dict[str, tuple[str, ...]] = {
    "identity": (),
    "rot90": ("flip_width", "transpose"),
    "rot180": ("flip_both",),
    "rot270": ("flip_height", "transpose"),
    "hflip": ("flip_width",),
    "vflip": ("flip_height",),
    "transpose": ("transpose",),
    "antitranspose": ("flip_both", "transpose"),
}
# Views that turn an (H, W) image into a (W, H) one.
_SWAPS_HEIGHT_AND_WIDTH = frozenset({"rot90", "rot270", "transpose", "antitranspose"})


class OnnxMismatchError(ValueError):
    """ONNX Runtime's output differs from PyTorch's by more than the tolerance."""


@dataclass
class OnnxCheck:
    """Comparison of one ONNX graph with PyTorch on a few random inputs."""

    file: str
    output: str  # "logits" or "probs"
    input_shapes: list[list[int]]  # (N, C, H, W) of each input compared
    max_abs_diff: float  # over all inputs, pixels and classes
    argmax_agreement: float  # minimum over inputs of the fraction of pixels with the same argmax
    output_max_abs: float  # max |PyTorch output|, which scales the allowed difference
    max_abs_diff_allowed: float  # tolerance times max(1, output_max_abs)
    min_argmax_agreement_allowed: float

    @property
    def passed(self) -> bool:
        return (
            self.max_abs_diff <= self.max_abs_diff_allowed
            and self.argmax_agreement >= self.min_argmax_agreement_allowed
        )

    def summary(self) -> str:
        shapes = ", ".join("x".join(str(size) for size in shape) for shape in self.input_shapes)
        return (
            f"{self.file}: ONNX Runtime vs PyTorch on {shapes}: max abs difference of {self.output} "
            f"{self.max_abs_diff:.3g} (allowed {self.max_abs_diff_allowed:.3g} for values up to "
            f"{self.output_max_abs:.3g}), same argmax on "
            f"{100 * self.argmax_agreement:.3f} % of pixels (required "
            f"{100 * self.min_argmax_agreement_allowed:g} %)"
        )

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def padding_multiple(model: nn.Module) -> int:
    """Return the multiple that `model` pads its input height and width to."""
    if isinstance(model, (CerviSegNet, BaselineSegmenter)):
        return int(model.stride)
    if isinstance(model, DeepLabV3PlusTeacher):
        return int(model.output_stride)
    raise ValueError(
        f"ONNX export supports CerviSegNet, DeepLabV3PlusTeacher and BaselineSegmenter models, got "
        f"{type(model).__name__}. Load the model with cervi_ray.checkpoint.load_model."
    )


class PaddedModel(nn.Module):
    """`model` behind reflect padding of the bottom and right edges to a multiple of its stride.

    The models pad inside their forward too, but behind an `if` on the padding size, which
    tracing fixes to the branch of the example input. Here the padding size is plain shape
    arithmetic that the tracer records, so the padded input always divides by the stride, and
    the model's own fixed branch (no padding) is right for every size. The result equals
    model(image) for sides of at least `multiple` pixels. Smaller sides use replicate padding in
    PyTorch, and ONNX Runtime may reject them because reflection needs the pad to be smaller
    than the side.
    """

    def __init__(self, model: nn.Module, multiple: int):
        super().__init__()
        self.model = model
        self.multiple = multiple

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        pad_height = (self.multiple - height % self.multiple) % self.multiple
        pad_width = (self.multiple - width % self.multiple) % self.multiple
        padded = F.pad(image, (0, pad_width, 0, pad_height), mode="reflect")
        logits = self.model(padded)  # (N, K, H + pad_height, W + pad_width)
        return logits[:, :, :height, :width]  # (N, K, H, W)


def apply_view(x: torch.Tensor, name: str) -> torch.Tensor:
    """Apply one TTA view to the last two dimensions of `x` with flips and transposes only."""
    for step in _VIEW_STEPS[name]:
        x = _run_step(x, step)
    return x


def invert_view(y: torch.Tensor, name: str) -> torch.Tensor:
    """Undo `apply_view(x, name)`."""
    for step in reversed(_VIEW_STEPS[name]):
        y = _run_step(y, step)
    return y


def _run_step(x: torch.Tensor, step: str) -> torch.Tensor:
    if step == "transpose":
        return x.transpose(-2, -1)
    if step == "flip_width":
        return x.flip(-1)
    if step == "flip_height":
        return x.flip(-2)
    return x.flip(-2, -1)  # flip_both


class TTAModel(nn.Module):
    """Averaged softmax probabilities over TTA views, as cervi_ray.tta.predict_with_tta returns.

    Views are grouped by orientation, not by the size of the example input: views that keep
    (H, W) run in one forward and views that give (W, H) in another. predict_with_tta groups
    square inputs into one forward, but tracing would fix that choice to the example's shape.
    """

    def __init__(self, model: nn.Module, transforms: Sequence[TTATransform]):
        super().__init__()
        self.model = model
        names = validate_transforms(transforms)
        self.transforms = names
        self.groups = [
            [name for name in names if name not in _SWAPS_HEIGHT_AND_WIDTH],
            [name for name in names if name in _SWAPS_HEIGHT_AND_WIDTH],
        ]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        batch_size = image.shape[0]
        probs_by_view: dict[str, torch.Tensor] = {}
        for group in self.groups:
            if not group:
                continue
            views = torch.cat([apply_view(image, name) for name in group])  # (V_g * N, C, h, w)
            probs = self.model(views).softmax(dim=1)  # (V_g * N, K, h, w), view-major
            for index, name in enumerate(group):
                view_probs = probs[index * batch_size:(index + 1) * batch_size]  # (N, K, h, w)
                probs_by_view[name] = invert_view(view_probs, name)  # (N, K, H, W)
        stacked = torch.stack([probs_by_view[name] for name in self.transforms])  # (V, N, K, H, W)
        return stacked.mean(dim=0)  # (N, K, H, W)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    example_size: int,
    num_classes: int,
    in_channels: int = 3,
    tta: Sequence[TTATransform] | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Export `model` to an ONNX file: TTA-free logits, or averaged TTA probabilities with `tta`.

    The graph is traced on one (1, in_channels, example_size, example_size) input, and the
    batch, height and width stay dynamic. `metadata` goes into the file's metadata_props, so
    a runtime without cervi_ray can read the labels and the normalisation. Returns the path.
    """
    import onnx

    path = Path(path)
    if example_size < padding_multiple(model):
        raise ValueError(
            f"example_size must be at least the model's padding multiple "
            f"{padding_multiple(model)}, got {example_size}. Pass a larger --onnx-size."
        )
    padded = PaddedModel(model, padding_multiple(model)).eval()
    graph = padded if tta is None else TTAModel(padded, tta).eval()
    output_name = LOGITS_NAME if tta is None else PROBS_NAME
    example = torch.zeros(1, in_channels, example_size, example_size)

    # Tracing warns at every Python int or bool taken from a tensor, and torch warns that this
    # exporter and its logging setup are deprecated. These warnings are expected here, and the
    # check against PyTorch at a second size catches a value that tracing fixed wrongly.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
        with torch.no_grad():
            torch.onnx.export(
                graph,
                (example,),
                str(path),
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=[output_name],
                dynamic_axes={INPUT_NAME: DYNAMIC_AXES, output_name: DYNAMIC_AXES},
                opset_version=OPSET_VERSION,
            )

    # The tracer leaves the class axis of the output unnamed: set it to K and add metadata.
    proto = onnx.load(str(path))
    class_axis = proto.graph.output[0].type.tensor_type.shape.dim[1]
    class_axis.Clear()
    class_axis.dim_value = num_classes
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key = key
        entry.value = value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    logger.debug("wrote %s", path)
    return path


def check_inputs(example_size: int, in_channels: int = 3, seed: int = 0) -> list[torch.Tensor]:
    """Random normalised inputs for `check_onnx`: a batch of 2 at the example size, then one odd size.

    The odd size, (example_size + 37) x (example_size + 19), is not square, and for an example size
    that divides by 32 (the default) neither side divides by 2. So the two inputs test the dynamic
    batch, the padding in the graph and both TTA groups.
    """
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(2, in_channels, example_size, example_size, generator=generator),
        torch.randn(1, in_channels, example_size + 37, example_size + 19, generator=generator),
    ]


def check_onnx(
    path: str | Path,
    reference: Callable[[torch.Tensor], torch.Tensor],
    inputs: Sequence[torch.Tensor],
    tolerance: float = MAX_ABS_DIFF,
    min_argmax_agreement: float = MIN_ARGMAX_AGREEMENT,
) -> OnnxCheck:
    """Run the ONNX file on ONNX Runtime (CPU) and `reference` on the same inputs, and compare.

    `reference` maps (N, C, H, W) to the PyTorch output of the graph's single output. The
    allowed max abs difference is `tolerance` times max(1, max |PyTorch output|). Raises
    OnnxMismatchError, with the max difference and the argmax agreement, when either is out of
    tolerance, and returns the comparison otherwise.
    """
    import onnxruntime

    path = Path(path)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    output_name = session.get_outputs()[0].name
    worst_diff = 0.0
    worst_agreement = 1.0
    output_max_abs = 0.0
    for image in inputs:
        with torch.no_grad():
            expected = reference(image).float().numpy()
        actual = session.run([output_name], {INPUT_NAME: image.numpy()})[0]
        if actual.shape != expected.shape:
            raise OnnxMismatchError(
                f"{path.name} returned {output_name} of shape {list(actual.shape)} for an input of "
                f"shape {list(image.shape)}, but PyTorch returned {list(expected.shape)}"
            )
        worst_diff = max(worst_diff, float(np.abs(actual - expected).max()))
        output_max_abs = max(output_max_abs, float(np.abs(expected).max()))
        agreement = float((actual.argmax(axis=1) == expected.argmax(axis=1)).mean())
        worst_agreement = min(worst_agreement, agreement)

    result = OnnxCheck(
        file=path.name,
        output=output_name,
        input_shapes=[list(image.shape) for image in inputs],
        max_abs_diff=worst_diff,
        argmax_agreement=worst_agreement,
        output_max_abs=output_max_abs,
        max_abs_diff_allowed=tolerance * max(1.0, output_max_abs),
        min_argmax_agreement_allowed=min_argmax_agreement,
    )
    if not result.passed:
        raise OnnxMismatchError(
            f"{result.summary()}. The exported graph does not reproduce the model. Export without "
            "ONNX (--no-onnx) to get a bundle with the PyTorch weights only, and report the model "
            "kind and torch version."
        )
    logger.info("%s", result.summary())
    return result


def export_and_check(
    model: nn.Module,
    folder: str | Path,
    example_size: int,
    num_classes: int,
    in_channels: int = 3,
    tta: Sequence[TTATransform] | None = None,
    metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Write model.onnx (and model_tta.onnx when `tta` names views) to `folder` and check both.

    Returns the JSON-ready record for the bundle's meta.json: exporter, versions, opset and,
    per file, its output, the TTA views and the check result. Raises OnnxMismatchError when
    ONNX Runtime does not reproduce PyTorch.
    """
    import onnx
    import onnxruntime

    folder = Path(folder)
    model = model.eval()
    inputs = check_inputs(example_size, in_channels)
    files: dict[str, Any] = {}

    logger.info("exporting %s (example input %d x %d)", MODEL_ONNX_FILE, example_size, example_size)
    path = export_onnx(model, folder / MODEL_ONNX_FILE, example_size, num_classes, in_channels, None, metadata)
    check = check_onnx(path, model, inputs)
    files[MODEL_ONNX_FILE] = {"output": LOGITS_NAME, "check": check.to_json()}

    if tta:
        names = validate_transforms(tta)
        logger.info("exporting %s with %d TTA views", TTA_ONNX_FILE, len(names))
        path = export_onnx(model, folder / TTA_ONNX_FILE, example_size, num_classes, in_channels, names, metadata)
        check = check_onnx(path, lambda image: predict_with_tta(model, image, names).probs, inputs)
        files[TTA_ONNX_FILE] = {"output": PROBS_NAME, "tta_transforms": list(names), "check": check.to_json()}

    return {
        "exporter": EXPORTER,
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "onnxruntime_version": onnxruntime.__version__,
        "opset_version": OPSET_VERSION,
        "input": INPUT_NAME,
        "dynamic_axes": {str(axis): name for axis, name in DYNAMIC_AXES.items()},
        "example_size": example_size,
        "min_side": padding_multiple(model),
        "files": files,
    }


def metadata_props(meta: dict[str, Any], preprocessing: dict[str, Any]) -> dict[str, str]:
    """ONNX metadata_props for a bundle's graphs: model kind, labels and input preprocessing."""
    return {
        "cervi_ray.model_kind": str(meta["model_kind"]),
        "cervi_ray.label_map": json.dumps(meta["label_map"]),
        "cervi_ray.code_version": str(meta.get("code_version", "")),
        "cervi_ray.preprocessing": json.dumps(preprocessing),
    }
