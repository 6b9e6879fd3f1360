"""Structured pruning of the CerviSegNet student: remove whole hidden units and channels.

Unlike magnitude pruning, the pruned layers are replaced by smaller ones, so the model has
fewer parameters and multiply-accumulates. What is removed, with the same keep_ratio everywhere:
  - the hidden units of the MLP of every timm SwinTransformerBlock (fc1 rows and biases, and
    the matching fc2 columns);
  - the output channels of each 3 x 3 conv + BatchNorm block of the decoder. The layer that
    reads them loses the matching input channels: the next block's conv, whose input starts
    with the upsampled decoder channels, or the classifier.
Attention heads, the stage widths (shared by residual connections and skips), the Compressor
and the patch embedding stay as they are.

A checkpoint of a pruned model must carry `parameter_shapes(model)` as meta["pruned_shapes"], so
cervi_ray.checkpoint.load_model can rebuild the smaller layers before loading the weights.
"""

import logging
import numbers
from typing import Any

import torch
from timm.layers import Mlp
from timm.models.swin_transformer import SwinTransformerBlock
from torch import nn

from cervi_ray.models.complexity import count_parameters
from cervi_ray.models.reshape import parameter_shapes, refresh_channel_attributes
from cervi_ray.models.student import CerviSegNet

logger = logging.getLogger(__name__)

__all__ = ["check_keep_ratio", "kept_count", "parameter_shapes", "prune_student_structured"]


def check_keep_ratio(keep_ratio: float) -> None:
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, numbers.Real) or not 0 < keep_ratio <= 1:
        raise ValueError(
            f"keep_ratio must be a number in (0, 1], the fraction of units to keep, got {keep_ratio!r}"
        )


def kept_count(total: int, keep_ratio: float) -> int:
    """Units kept out of `total`: round(keep_ratio * total), at least 1."""
    return max(1, round(keep_ratio * total))


def prune_student_structured(model: CerviSegNet, keep_ratio: float) -> dict[str, Any]:
    """Remove the least important MLP hidden units and decoder channels of `model`, in place.

    Importance, largest kept, ties kept in index order:
      - Swin MLP hidden unit j: L1 norm of fc1.weight[j] times L1 norm of fc2.weight[:, j], an
        estimate of how much the unit can move the block output (fc1 bias not counted);
      - decoder channel c: L1 norm of the 3 x 3 conv filter that produces it.
    Kept units stay in their original order. The model keeps accepting any input size and
    returns logits of the same shape. Build the optimizer after pruning, since the pruned layers
    are new modules with new parameters.

    Returns a JSON-ready summary: keep_ratio, parameters_before, parameters_after and, per
    pruned layer, {"kept": ..., "total": ...}.
    """
    check_keep_ratio(keep_ratio)
    if not isinstance(model, CerviSegNet):
        raise TypeError(
            f"prune_student_structured needs a CerviSegNet, got {type(model).__name__}; for a "
            "StudentWithAdapter pass its .student and rebuild the adapter afterwards"
        )
    swin_blocks = [
        (name, module) for name, module in model.named_modules() if isinstance(module, SwinTransformerBlock)
    ]
    for name, block in swin_blocks:
        _check_swin_mlp(name, block)
    _check_decoder(model)

    parameters_before = count_parameters(model)
    layers: dict[str, dict[str, int]] = {}
    with torch.no_grad():
        for name, block in swin_blocks:
            layers[f"{name}.mlp"] = _prune_swin_mlp(block, keep_ratio)
        layers.update(_prune_decoder(model, keep_ratio))
    refresh_channel_attributes(model)

    summary = {
        "kind": "structured",
        "keep_ratio": float(keep_ratio),
        "parameters_before": parameters_before,
        "parameters_after": count_parameters(model),
        "layers": layers,
    }
    logger.info(
        "structured pruning at keep_ratio %.3f: %d -> %d parameters over %d layers",
        keep_ratio, summary["parameters_before"], summary["parameters_after"], len(layers),
    )
    return summary


def _check_swin_mlp(name: str, block: SwinTransformerBlock) -> None:
    mlp = block.mlp
    if type(mlp) is not Mlp or type(mlp.fc1) is not nn.Linear or type(mlp.fc2) is not nn.Linear:
        raise ValueError(
            f"{name}.mlp must be a timm Mlp of two nn.Linear layers to prune its hidden units, "
            f"got {type(mlp).__name__}"
        )
    if not isinstance(mlp.norm, nn.Identity):
        raise ValueError(
            f"{name}.mlp has a {type(mlp.norm).__name__} between fc1 and fc2, which this pruning "
            "does not shrink; only Swin MLPs without a hidden norm are supported"
        )


def _check_decoder(model: CerviSegNet) -> None:
    for index, block in enumerate(model.decoder.fuse):
        layer_types = [type(layer) for layer in block]
        if layer_types[:2] != [nn.Conv2d, nn.BatchNorm2d] or block[0].groups != 1:
            raise ValueError(
                f"decoder.fuse.{index} must start with an ungrouped nn.Conv2d and an "
                f"nn.BatchNorm2d, got {[t.__name__ for t in layer_types]}"
            )


def _prune_swin_mlp(block: SwinTransformerBlock, keep_ratio: float) -> dict[str, int]:
    fc1, fc2 = block.mlp.fc1, block.mlp.fc2  # fc1: C -> hidden, fc2: hidden -> C
    hidden = fc1.out_features
    kept_units = kept_count(hidden, keep_ratio)
    if kept_units < hidden:
        importance = fc1.weight.abs().sum(dim=1) * fc2.weight.abs().sum(dim=0)  # (hidden,)
        index = _largest(importance, kept_units)
        block.mlp.fc1 = _linear_subset(fc1, out_index=index)
        block.mlp.fc2 = _linear_subset(fc2, in_index=index)
    return {"kept": kept_units, "total": hidden}


def _prune_decoder(model: CerviSegNet, keep_ratio: float) -> dict[str, dict[str, int]]:
    fuse = model.decoder.fuse
    layers = {}
    for position, block in enumerate(fuse):
        conv, norm = block[0], block[1]
        total = conv.out_channels
        kept_channels = kept_count(total, keep_ratio)
        layers[f"decoder.fuse.{position}"] = {"kept": kept_channels, "total": total}
        if kept_channels == total:
            continue
        index = _largest(conv.weight.abs().sum(dim=(1, 2, 3)), kept_channels)  # filter L1 norms, (C_out,)
        block[0] = _conv_subset(conv, out_index=index)
        block[1] = _batchnorm_subset(norm, index, conv.weight.dtype)

        # The consumer reads these channels first: the next block's input is
        # cat([upsampled decoder map, skip]), and the classifier reads the last block alone.
        if position + 1 < len(fuse):
            consumer = fuse[position + 1][0]
            skip_channels = torch.arange(total, consumer.in_channels, device=index.device)
            fuse[position + 1][0] = _conv_subset(consumer, in_index=torch.cat([index, skip_channels]))
        else:
            model.classifier = _conv_subset(model.classifier, in_index=index)
    return layers


def _largest(importance: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` largest values, ties to the lower index, in ascending order."""
    order = torch.sort(importance, descending=True, stable=True).indices
    return order[:count].sort().values


def _linear_subset(
    linear: nn.Linear, out_index: torch.Tensor | None = None, in_index: torch.Tensor | None = None
) -> nn.Linear:
    weight = linear.weight  # (out, in)
    if out_index is not None:
        weight = weight[out_index]
    if in_index is not None:
        weight = weight[:, in_index]
    has_bias = linear.bias is not None
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device=weight.device, dtype=weight.dtype)
    new.weight.copy_(weight)
    if has_bias:
        new.bias.copy_(linear.bias if out_index is None else linear.bias[out_index])
    return new.train(linear.training)


def _conv_subset(
    conv: nn.Conv2d, out_index: torch.Tensor | None = None, in_index: torch.Tensor | None = None
) -> nn.Conv2d:
    weight = conv.weight  # (C_out, C_in, kH, kW), ungrouped
    if out_index is not None:
        weight = weight[out_index]
    if in_index is not None:
        weight = weight[:, in_index]
    has_bias = conv.bias is not None
    new = nn.Conv2d(
        weight.shape[1], weight.shape[0], conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, bias=has_bias, padding_mode=conv.padding_mode,
        device=weight.device, dtype=weight.dtype,
    )
    new.weight.copy_(weight)
    if has_bias:
        new.bias.copy_(conv.bias if out_index is None else conv.bias[out_index])
    return new.train(conv.training)


def _batchnorm_subset(norm: nn.BatchNorm2d, index: torch.Tensor, dtype: torch.dtype) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(
        len(index), eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
        track_running_stats=norm.track_running_stats, device=index.device, dtype=dtype,
    )
    if norm.affine:
        new.weight.copy_(norm.weight[index])
        new.bias.copy_(norm.bias[index])
    if norm.track_running_stats:
        new.running_mean.copy_(norm.running_mean[index])
        new.running_var.copy_(norm.running_var[index])
        new.num_batches_tracked.copy_(norm.num_batches_tracked)
    return new.train(norm.training)
