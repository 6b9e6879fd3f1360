"""Checkpoint folders: safetensors weights, weights-only optimizer state and a JSON description.

Layout of a checkpoint folder:
  model.safetensors     network weights (the student alone for distillation runs)
  adapter.safetensors   distillation feature adapter (distillation runs only)
  training_state.pt     optimizer and LR-scheduler state, loaded with weights_only=True
  meta.json             model kind, classes, resolved config, training resolution, code version,
                        epoch, best validation Dice and the metric history

Pruned models: callers describe pruning in the meta dict they pass to save_checkpoint. A
structurally pruned model needs meta["pruned_shapes"] = parameter_shapes(model)
(cervi_ray.models.reshape), because its layers are smaller than the config builds. load_model
then rebuilds those layers before loading the weights. meta["pruning"] may hold a description
such as {"kind": "magnitude", "sparsity": 0.5} or the summary of prune_student_structured; it is
stored as given. Magnitude-pruned models keep their shapes and need neither key.

Nothing here executes code from the files it loads: weights come from safetensors and the
optimizer state through torch.load(weights_only=True), which rejects pickled objects.
"""

import json
import logging
import pickle
import subprocess
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

import cervi_ray
from cervi_ray.config import Config, config_from_dict
from cervi_ray.data.labels import CLASS_NAMES
from cervi_ray.models import ModelKind, build_model
from cervi_ray.models.reshape import parameter_shapes, reshape_to

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
ADAPTER_FILE = "adapter.safetensors"
TRAINING_STATE_FILE = "training_state.pt"
META_FILE = "meta.json"
PRUNED_SHAPES_KEY = "pruned_shapes"


class UnsafeCheckpointError(pickle.UnpicklingError, ValueError):
    """A checkpoint file that torch.load(weights_only=True) rejects, such as one with pickled code."""


def code_version() -> str:
    """Package version plus the git commit of the source tree when it is a checkout."""
    version = cervi_ray.__version__
    source = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=source, capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version}+g{commit}" if commit else version


def class_names(label_mode: str) -> list[str]:
    return list(CLASS_NAMES) if label_mode == "full" else ["not_nucleus", "nucleus"]


def describe_model(config: Config, kind: ModelKind) -> dict[str, Any]:
    """The self-description stored in meta.json: enough to rebuild and apply the model."""
    data = config.data
    names = class_names(data.label_mode)
    return {
        "format_version": FORMAT_VERSION,
        "model_kind": kind,
        "num_classes": len(names),
        "label_map": {name: index for index, name in enumerate(names)},
        "label_mode": data.label_mode,
        # The model sees images resampled by `scale`, so its pixels are mpp / scale microns.
        "training_resolution": {
            "scale": data.scale,
            "source_mpp": data.mpp,
            "mpp": None if data.mpp is None else data.mpp / data.scale,
            "source_magnification": data.magnification,
            "magnification": None if data.magnification is None else data.magnification * data.scale,
        },
        "config": config.model_dump(mode="json"),
        "code_version": code_version(),
    }


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper, or the model itself."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def save_checkpoint(
    folder: str | Path,
    model: nn.Module,
    meta: dict[str, Any],
    adapter: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
) -> Path:
    """Write the model weights, optional adapter and optimizer state, and `meta` to `folder`.

    When meta has "pruned_shapes", they must equal parameter_shapes(model), so that load_model
    rebuilds exactly this model. Raises ValueError when they differ.
    """
    folder = Path(folder)
    if PRUNED_SHAPES_KEY in meta:
        _check_pruned_shapes(unwrap(model), meta[PRUNED_SHAPES_KEY])
    folder.mkdir(parents=True, exist_ok=True)
    save_file(_contiguous(unwrap(model).state_dict()), str(folder / MODEL_FILE))
    if adapter is not None:
        save_file(_contiguous(adapter.state_dict()), str(folder / ADAPTER_FILE))
    if optimizer is not None:
        state = {"optimizer": optimizer.state_dict()}
        if scheduler is not None:
            state["scheduler"] = scheduler.state_dict()
        torch.save(state, folder / TRAINING_STATE_FILE)
    (folder / META_FILE).write_text(json.dumps(meta, indent=2, allow_nan=False, default=_json_default))
    return folder


def _check_pruned_shapes(model: nn.Module, pruned_shapes: dict[str, list[int]]) -> None:
    if not isinstance(pruned_shapes, dict):
        raise ValueError(
            f"meta[{PRUNED_SHAPES_KEY!r}] must be a dict from parameter_shapes(model), got "
            f"{type(pruned_shapes).__name__}"
        )
    actual = parameter_shapes(model)
    saved = {key: list(shape) for key, shape in pruned_shapes.items()}
    if saved != actual:
        differing = [key for key in actual if saved.get(key) != actual[key]]
        differing += [key for key in saved if key not in actual]
        raise ValueError(
            f"meta[{PRUNED_SHAPES_KEY!r}] does not match the model being saved ({len(differing)} "
            f"entries differ, first: {differing[:3]}); set it to parameter_shapes(model) after pruning"
        )


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses views and shared storage; a contiguous copy of each tensor avoids both.
    return {key: value.detach().cpu().contiguous().clone() for key, value in state.items()}


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"checkpoint metadata value {value!r} of type {type(value).__name__} is not JSON")


def read_meta(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a cervi_ray checkpoint: {META_FILE} is missing. Point to a folder "
            "written by training (a checkpoint_* folder of the run) or by the export command."
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"checkpoint description {meta_path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise ValueError(
            f"checkpoint description {meta_path} must be a JSON object, got {type(meta).__name__}. "
            "Point to a folder written by training or by the export command."
        )
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {folder} has format_version {version!r}; this cervi_ray reads "
            f"version {FORMAT_VERSION}. Re-export it with a matching cervi_ray release."
        )
    return meta


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network described by a checkpoint folder and load its weights (eval mode).

    A structurally pruned model (meta has "pruned_shapes") is built from the config and then
    reshaped to the saved layer sizes with cervi_ray.models.reshape.reshape_to.
    """
    folder = Path(folder)
    meta = read_meta(folder)
    config = config_from_dict(meta["config"], origin=f"config stored in {folder / META_FILE}")
    model = build_model(meta["model_kind"], config.model, meta["num_classes"])
    if PRUNED_SHAPES_KEY in meta:
        reshape_to(model, meta[PRUNED_SHAPES_KEY])
    weights_path = folder / MODEL_FILE
    if not weights_path.is_file():
        pickled = sorted(path.name for path in folder.glob("*.pt*") if path.name != TRAINING_STATE_FILE)
        found = f" (found {', '.join(pickled)}, which cervi_ray does not load because pickles can run code)" if pickled else ""
        raise FileNotFoundError(
            f"checkpoint {folder} has no {MODEL_FILE}{found}. Pass a checkpoint folder that cervi_ray "
            f"wrote (train-teacher, distill, prune or export), or save the state dict with "
            f"safetensors.torch.save_file as {MODEL_FILE} beside {META_FILE}."
        )
    state = remap_state_dict(load_weights(weights_path), meta)
    _check_weight_shapes(model, state, weights_path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"weights in {weights_path} do not fit the {meta['model_kind']} described in "
            f"{META_FILE}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.to(device).eval(), meta


def _check_weight_shapes(model: nn.Module, state: dict[str, torch.Tensor], weights_path: Path) -> None:
    """Raise ValueError naming the first saved tensor whose shape differs from the model's."""
    model_state = model.state_dict()
    for key, value in state.items():
        if key in model_state and value.shape != model_state[key].shape:
            raise ValueError(
                f"{key} in {weights_path} has shape {list(value.shape)}, but the model built from "
                f"{META_FILE} has {list(model_state[key].shape)}. Weights of a structurally pruned "
                f"model need meta[{PRUNED_SHAPES_KEY!r}] = parameter_shapes(model) when saved."
            )


def remap_state_dict(state: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Rename keys saved by older layouts to the current module names.

    Strips the "module." prefix that DistributedDataParallel adds, in case weights were saved
    from the wrapper instead of the unwrapped model.
    """
    del meta  # future format versions will branch on it
    prefix = "module."
    if all(key.startswith(prefix) for key in state):
        return {key[len(prefix):]: value for key, value in state.items()}
    return state


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file, raising ValueError naming the file when it is not one."""
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise ValueError(
            f"cannot read weights {path}: {e}. The file is truncated, damaged or not a safetensors "
            "file (cervi_ray never loads weights from pickled torch.save files). Restore the "
            "checkpoint from its source, or train or export it again."
        ) from None


def load_adapter_state(folder: str | Path) -> dict[str, torch.Tensor] | None:
    path = Path(folder) / ADAPTER_FILE
    return load_weights(path) if path.is_file() else None


def load_training_state(folder: str | Path) -> dict[str, Any] | None:
    """Optimizer and scheduler state, or None when the folder has none.

    Raises UnsafeCheckpointError when torch.load(weights_only=True) rejects the file's objects
    (pickled code among them), and ValueError when it is not a torch.save file.
    """
    path = Path(folder) / TRAINING_STATE_FILE
    if not path.is_file():
        return None
    advice = "Delete the file to resume with a fresh optimizer state, or restore the checkpoint from its source."
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message suggests weights_only=False or allowlisting the global, which would run
        # the payload. Keep only the reason, which follows "WeightsUnpickler error:" in torch 2.14.
        reason = str(e).rpartition("WeightsUnpickler error:")[2].strip().split(". ")[0]
        raise UnsafeCheckpointError(
            f"optimizer state {path} contains objects that torch.load(weights_only=True) rejects "
            f"({reason}). Unpickling them could run code, so cervi_ray does not load them. {advice}"
        ) from None
    except (EOFError, KeyError, RuntimeError) as e:
        raise ValueError(
            f"optimizer state {path} is empty, truncated or not a torch.save file "
            f"({type(e).__name__}: {e}). {advice}"
        ) from None
