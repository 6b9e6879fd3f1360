"""Magnitude (unstructured) pruning: zero every prunable weight whose |w| is under one global threshold.

Typical use, with the threshold raised step by step and fine-tuning after each kept step:

    params = prunable_parameters(model)
    masks = magnitude_masks(params, global_threshold(params, sparsity=0.5))
    apply_masks(model, masks)
    ...  # fine-tune, calling enforce_masks(model, masks) after every optimizer step

Zeroed weights keep the dense tensor shapes, so the model is neither smaller nor faster; see
cervi_ray.pruning.structured for pruning that removes whole units.
"""

import logging
import math
import numbers
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

logger = logging.getLogger(__name__)

# Layers whose weights are pruned by default.
WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
# Normalisation layers: their weights are scales, pruned only with include_norm=True.
NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
# Module names that mark a model's output layer: CerviSegNet.classifier, and the
# segmentation_head of segmentation_models_pytorch models (the teacher's `net` and the baselines).
OUTPUT_MODULE_NAMES = ("classifier", "segmentation_head")
MASK_FILE_FORMAT = "cervi_ray.pruning.masks"


def is_output_module(name: str) -> bool:
    """Whether the module at dotted path `name` is, or sits inside, a model's output layer.

    The rule matches any path component named in OUTPUT_MODULE_NAMES, so it also applies behind
    wrappers that prefix names ("module." for DDP, "student." for StudentWithAdapter).
    """
    return any(part in OUTPUT_MODULE_NAMES for part in name.split("."))


def prunable_parameters(
    model: nn.Module, include_norm: bool = False, include_output: bool = False
) -> dict[str, nn.Parameter]:
    """Collect the weight tensors that magnitude pruning may zero, keyed by parameter name.

    Included: the `weight` of every nn.Linear, nn.Conv1d and nn.Conv2d. Never included: biases,
    and parameters of other module types such as the relative position bias tables of Swin
    attention. Normalisation weights (LayerNorm, GroupNorm, BatchNorm) are included only with
    include_norm=True, and layers inside the output layer (see `is_output_module`) only with
    include_output=True.
    """
    params: dict[str, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, WEIGHT_LAYERS):
            selected = True
        elif isinstance(module, NORM_LAYERS):
            selected = include_norm
        else:
            continue
        if not include_output and is_output_module(module_name):
            selected = False
        weight = getattr(module, "weight", None)
        if selected and isinstance(weight, nn.Parameter):
            params[f"{module_name}.weight" if module_name else "weight"] = weight
    return params


def check_sparsity(sparsity: float) -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not 0 <= sparsity < 1:
        raise ValueError(
            f"sparsity must be a number in [0, 1), the fraction of prunable weights to zero, "
            f"got {sparsity!r}"
        )


def global_threshold(params: Mapping[str, torch.Tensor], sparsity: float) -> float:
    """Find the magnitude threshold that zeroes a `sparsity` fraction of all weights in `params`.

    The target is k = round(sparsity * n) zeroed weights out of n, pooled over all tensors. Masks
    keep |w| >= threshold. Tie rule: when several weights share the magnitude at the k-th place,
    they are all kept or all zeroed, whichever count is closer to k, and all kept when both are
    equally close. So the result is exact whenever no tie crosses the k-th place. Sparsity 0
    returns 0.0, which keeps every weight.

    NOTE: with parameters of mixed dtypes (fp16 and fp32, say) the threshold is a value of the
    promoted dtype, and the masks compare it in each parameter's own dtype, so the count can be
    off by the weights that round onto it.
    """
    check_sparsity(sparsity)
    if not params:
        raise ValueError("params is empty: pass prunable_parameters(model) of a model with weights")

    # All magnitudes in ascending order. torch.cat promotes mixed dtypes to a common one.
    magnitudes = torch.cat([p.detach().abs().flatten() for p in params.values()]).sort().values
    count = magnitudes.numel()
    target = round(sparsity * count)
    if target == 0:
        return 0.0

    boundary = magnitudes[target - 1]  # the largest magnitude that the target would zero
    zeroed_keeping_ties = int(torch.searchsorted(magnitudes, boundary, right=False))
    zeroed_with_ties = int(torch.searchsorted(magnitudes, boundary, right=True))
    if target - zeroed_keeping_ties <= zeroed_with_ties - target:
        return boundary.item()
    if zeroed_with_ties < count:
        return magnitudes[zeroed_with_ties].item()  # the next larger magnitude
    # Every weight is tied at the maximum: the smallest value above it, in the weights' dtype.
    return torch.nextafter(boundary, boundary.new_tensor(math.inf)).item()


def magnitude_masks(params: Mapping[str, torch.Tensor], threshold: float) -> dict[str, torch.Tensor]:
    """Build keep-masks: True where |w| >= threshold, compared in each parameter's dtype."""
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not threshold >= 0:
        raise ValueError(f"threshold must be a number >= 0, got {threshold!r}")
    return {name: param.detach().abs() >= threshold for name, param in params.items()}


def _check_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, nn.Parameter]:
    """Return the model's parameter for each mask, after checking names, shapes and dtype."""
    model_params = dict(model.named_parameters())
    matched = {}
    for name, mask in masks.items():
        param = model_params.get(name)
        if param is None:
            raise ValueError(
                f"mask {name!r} names no parameter of this {type(model).__name__}: the masks were "
                "made for another model. Build masks from prunable_parameters(model) of this model."
            )
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            kind = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask {name!r} must be a bool tensor, got {kind}")
        if mask.shape != param.shape:
            raise ValueError(
                f"mask {name!r} must have the parameter's shape {list(param.shape)}, got "
                f"{list(mask.shape)}: the masks were made for a model of other shapes "
                "(for example before structured pruning)."
            )
        matched[name] = param
    return matched


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero, in place, every weight whose mask entry is False.

    Raises ValueError when a mask names no parameter of `model` or has another shape.
    """
    params = _check_masks(model, masks)
    with torch.no_grad():
        for name, param in params.items():
            param.masked_fill_(~masks[name].to(param.device), 0.0)


def enforce_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the pruned weights again: call after every optimizer step while fine-tuning.

    The gradient of a zeroed weight is in general not zero, so an optimizer step moves it away
    from zero, and Adam/AdamW momentum keeps moving it for later steps even once its gradient
    is zero. AdamW's weight decay alone does not revive a zero weight, since it only shrinks.
    Register it once with
    `optimizer.register_step_post_hook(lambda *_: enforce_masks(model, masks))` or call it
    after `optimizer.step()`.

    Masks on another device than their parameter are moved there and stored back into
    `masks`, so later calls skip the copy.
    """
    params = _check_masks(model, masks)
    with torch.no_grad():
        for name, param in params.items():
            if masks[name].device != param.device:
                masks[name] = masks[name].to(param.device)
            param.masked_fill_(~masks[name], 0.0)


def sparsity_summary(model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None) -> dict[str, float | int]:
    """Count parameters and zeros of the whole model and of its prunable set.

    The prunable set is the parameters named in `masks`, or `prunable_parameters(model)` when
    masks is None. Zeros are counted in the current values, so weights that were zero before
    pruning count as zeroed, and a pruned weight revived by the optimizer does not.
    """
    prunable = _check_masks(model, masks) if masks is not None else prunable_parameters(model)
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    nonzero = sum(int(torch.count_nonzero(p.detach())) for p in params)
    prunable_total = sum(p.numel() for p in prunable.values())
    prunable_zeroed = sum(p.numel() - int(torch.count_nonzero(p.detach())) for p in prunable.values())
    return {
        "total_parameters": total,
        "nonzero_parameters": nonzero,
        "prunable_parameters": prunable_total,
        "zeroed_prunable_parameters": prunable_zeroed,
        "prunable_sparsity": prunable_zeroed / prunable_total if prunable_total else 0.0,
        "model_sparsity": (total - nonzero) / total if total else 0.0,
    }


def prune_by_magnitude(
    model: nn.Module, sparsity: float, include_norm: bool = False, include_output: bool = False
) -> dict[str, torch.Tensor]:
    """Zero the smallest-magnitude `sparsity` fraction of the prunable weights; return the masks."""
    params = prunable_parameters(model, include_norm=include_norm, include_output=include_output)
    threshold = global_threshold(params, sparsity)
    masks = magnitude_masks(params, threshold)
    apply_masks(model, masks)
    summary = sparsity_summary(model, masks)
    logger.info(
        "magnitude pruning: threshold %.3g zeroes %d of %d prunable weights (sparsity %.4f, requested %.4f)",
        threshold, summary["zeroed_prunable_parameters"], summary["prunable_parameters"],
        summary["prunable_sparsity"], sparsity,
    )
    return masks


def save_masks(masks: Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """Write masks to a safetensors file, each as a uint8 tensor of 0 (pruned) and 1 (kept)."""
    path = Path(path)
    tensors = {name: mask.detach().to(device="cpu", dtype=torch.uint8).contiguous() for name, mask in masks.items()}
    save_file(tensors, str(path), metadata={"format": MASK_FILE_FORMAT})
    logger.debug("wrote %d pruning masks to %s", len(tensors), path)
    return path


def load_masks(path: str | Path) -> dict[str, torch.Tensor]:
    """Read masks written by `save_masks` as bool tensors on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask file {path} not found: write one with save_masks(masks, path)")
    masks = {}
    for name, stored in load_file(str(path)).items():
        if stored.dtype != torch.uint8:
            raise ValueError(
                f"mask {name!r} in {path} must be stored as uint8, got {stored.dtype}: "
                "the file was not written by save_masks"
            )
        masks[name] = stored.bool()
    return masks
