"""Rebuild layers of a freshly built model to the parameter shapes saved with pruned weights.

Structured pruning (cervi_ray.pruning.structured) shrinks layers, so its weights no longer fit
the model that the config builds. A checkpoint of such a model stores `parameter_shapes(model)`
as meta["pruned_shapes"], and loading calls `reshape_to(model, shapes)` on the config-built
model before `load_state_dict`.
"""

import logging
from collections.abc import Mapping

from timm.models.swin_transformer import SwinTransformerBlock
from torch import nn

from cervi_ray.models.student import CerviSegNet

logger = logging.getLogger(__name__)

# Module types that reshape_to can rebuild. Exact types: a subclass may carry behaviour or
# constructor arguments that a rebuilt base-class module would lose.
RESHAPABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)


def parameter_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Return the shape of every state_dict entry (parameters and buffers), JSON-ready."""
    return {key: list(value.shape) for key, value in model.state_dict().items()}


def reshape_to(model: nn.Module, shapes: Mapping[str, list[int]]) -> nn.Module:
    """Replace, in place, every layer whose state_dict shapes differ from `shapes`.

    Each such nn.Linear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d or nn.LayerNorm
    becomes a freshly initialised module of the same type with the saved shapes and the old
    module's other settings (bias presence, kernel size, stride, padding, dilation, eps,
    momentum, train/eval mode, requires_grad). Its values are meant to be overwritten by
    `model.load_state_dict(saved_state)` right after. Returns `model`.

    Raises ValueError when `shapes` names other entries than the model's state_dict, or when a
    differing entry belongs to another module type (the message names the entry and both
    shapes).
    """
    current = parameter_shapes(model)
    _check_same_keys(current, shapes)

    # Group the differing entries by the module that owns them.
    changed: dict[str, dict[str, list[int]]] = {}
    for key, saved_shape in shapes.items():
        if list(saved_shape) != current[key]:
            module_name, _, local_name = key.rpartition(".")
            changed.setdefault(module_name, {})[local_name] = list(saved_shape)

    for module_name, module_shapes in changed.items():
        if not module_name:
            raise ValueError(
                f"cannot reshape {sorted(module_shapes)}: they belong to the model itself, and "
                "reshape_to only replaces submodules"
            )
        old = model.get_submodule(module_name)
        new = _rebuild(old, module_name, module_shapes, current)
        parent_name, _, child_name = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, new)

    refresh_channel_attributes(model)
    if changed:
        logger.info("rebuilt %d layers to saved pruned shapes", len(changed))
    return model


def _check_same_keys(current: Mapping[str, list[int]], shapes: Mapping[str, list[int]]) -> None:
    missing = [key for key in current if key not in shapes]
    unexpected = [key for key in shapes if key not in current]
    if missing or unexpected:
        raise ValueError(
            f"shapes do not describe this {len(current)}-entry model: {len(missing)} entries "
            f"missing (first: {missing[:3]}), {len(unexpected)} unexpected (first: "
            f"{unexpected[:3]}). Pass the shapes saved for this model kind and config."
        )


def _rebuild(
    old: nn.Module,
    module_name: str,
    module_shapes: Mapping[str, list[int]],
    current: Mapping[str, list[int]],
) -> nn.Module:
    """Build a fresh module of old's type and settings whose state_dict has the requested shapes."""
    if type(old) not in RESHAPABLE_TYPES:
        local_name, saved_shape = next(iter(module_shapes.items()))
        key = f"{module_name}.{local_name}"
        raise ValueError(
            f"cannot reshape {key} from {current[key]} to saved shape {saved_shape}: it belongs to "
            f"a {type(old).__name__}, and reshape_to rebuilds only "
            f"{', '.join(t.__name__ for t in RESHAPABLE_TYPES)}"
        )
    # Shapes of all of the module's own entries, saved ones where they changed.
    own_shapes = {
        name: list(module_shapes.get(name, list(value.shape)))
        for name, value in old.state_dict().items()
    }
    try:
        new = _construct_like(old, own_shapes)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(
            f"cannot rebuild {type(old).__name__} {module_name} to saved shapes {own_shapes}: {e}"
        ) from e

    rebuilt_shapes = {name: list(value.shape) for name, value in new.state_dict().items()}
    if rebuilt_shapes != own_shapes:
        raise ValueError(
            f"saved shapes {own_shapes} of {type(old).__name__} {module_name} do not fit one "
            f"layer (a rebuilt layer has {rebuilt_shapes}): the shapes are inconsistent"
        )
    new.train(old.training)
    for name, param in new.named_parameters():
        param.requires_grad_(old.get_parameter(name).requires_grad)
    return new


def _construct_like(old: nn.Module, shapes: Mapping[str, list[int]]) -> nn.Module:
    """Call old's constructor with its settings and the sizes read from `shapes`."""
    reference = next(old.parameters(), None)
    if reference is None:
        reference = next(old.buffers())
    factory = {"device": reference.device, "dtype": reference.dtype}

    if isinstance(old, nn.Linear):
        out_features, in_features = shapes["weight"]
        return nn.Linear(in_features, out_features, bias=old.bias is not None, **factory)

    if isinstance(old, (nn.Conv1d, nn.Conv2d)):
        out_channels, in_per_group = shapes["weight"][:2]
        return type(old)(
            in_per_group * old.groups, out_channels, old.kernel_size, stride=old.stride,
            padding=old.padding, dilation=old.dilation, groups=old.groups,
            bias=old.bias is not None, padding_mode=old.padding_mode, **factory,
        )

    if isinstance(old, (nn.BatchNorm1d, nn.BatchNorm2d)):
        sized_entry = "weight" if old.affine else "running_mean"
        return type(old)(
            shapes[sized_entry][0], eps=old.eps, momentum=old.momentum, affine=old.affine,
            track_running_stats=old.track_running_stats, **factory,
        )

    # nn.LayerNorm: only an affine LayerNorm has entries whose shapes can differ.
    return nn.LayerNorm(
        shapes["weight"], eps=old.eps, elementwise_affine=True, bias=old.bias is not None, **factory
    )


def refresh_channel_attributes(model: nn.Module) -> None:
    """Update the width attributes that models keep beside their layers after layers shrank.

    CerviSegNet: decoder.out_channels and feature_channels["decoder"] follow the classifier's
    input channels, which is what a distillation adapter must be built for. Swin blocks:
    mlp_ratio follows the MLP hidden width.
    """
    for module in model.modules():
        if isinstance(module, CerviSegNet):
            decoder_channels = module.classifier.in_channels
            module.decoder.out_channels = decoder_channels
            module.feature_channels = {**module.feature_channels, "decoder": decoder_channels}
        elif isinstance(module, SwinTransformerBlock):
            module.mlp_ratio = module.mlp.fc1.out_features / module.dim
