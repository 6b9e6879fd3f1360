"""The JSON records of a bundle: labels.json, preprocessing.json and metrics.json."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cervi_ray.config import Config
from cervi_ray.data.dataset import IMAGE_MEAN, IMAGE_STD
from cervi_ray.export.onnx_export import INPUT_NAME, LOGITS_NAME, PROBS_NAME, TTA_ONNX_FILE

EVALUATE_METRICS_FILE = "metrics.json"  # written by `cervi-ray evaluate` under <output>/<model>/

_CLASS_DESCRIPTIONS = {
    "background": "slide background and everything outside the annotated cells",
    "cytoplasm": "cell area minus its nuclei",
    "nucleus": "cell nuclei",
    "not_nucleus": "background and cytoplasm, which nucleus-only annotations do not separate",
}


def labels_record(meta: dict[str, Any]) -> dict[str, Any]:
    """labels.json: label values, class names in value order and what each class covers."""
    label_map = {name: int(value) for name, value in meta["label_map"].items()}
    names = [name for name, _ in sorted(label_map.items(), key=lambda item: item[1])]
    return {
        "label_mode": meta["label_mode"],
        "num_classes": meta["num_classes"],
        "label_map": label_map,
        "class_names": names,  # class_names[value] is the name of label value `value`
        "descriptions": {name: _CLASS_DESCRIPTIONS.get(name, "") for name in names},
    }


def preprocessing_record(
    meta: dict[str, Any], config: Config, multiple: int, tta: Sequence[str] | None
) -> dict[str, Any]:
    """preprocessing.json: what to do to an image before the model, as cervi_ray does it."""
    resolution = dict(meta["training_resolution"])
    data = config.data
    if data.crop_size is not None:
        training_input = f"random {data.crop_size} x {data.crop_size} crops after resizing by scale"
    elif data.resize_to is not None:
        training_input = f"whole images resized to {data.resize_to} x {data.resize_to}"
    else:
        training_input = "whole images after resizing by scale"
    return {
        "input": {
            "layout": "NCHW",
            "dtype": "float32",
            "channels": config.model.in_channels,
            "channel_order": "RGB",
            "onnx_input": INPUT_NAME,
        },
        "grayscale": "repeat the single channel three times (R = G = B) before normalising",
        "normalisation": {
            "mean": list(IMAGE_MEAN),
            "std": list(IMAGE_STD),
            "formula": "(uint8 value / 255 - mean[channel]) / std[channel]",
        },
        "resolution": {
            **resolution,
            "description": describe_resolution(resolution),
            "resample": "cv2.INTER_AREA when shrinking, cv2.INTER_LINEAR when enlarging",
        },
        "size": {
            "padding_multiple": multiple,
            "padding": "reflect, bottom and right edges; the model and the ONNX graphs pad and crop themselves",
            "min_side_onnx": multiple,
            "nominal_input_size": config.model.input_size,
            "training_input": training_input,
        },
        "output": {
            LOGITS_NAME: "(N, K, H, W) scores at the input size; argmax over K gives the label values of labels.json",
            PROBS_NAME: f"(N, K, H, W) softmax probabilities averaged over the TTA views, in {TTA_ONNX_FILE}",
        },
        "tta": {"transforms": list(tta), "onnx_file": TTA_ONNX_FILE} if tta else None,
    }


def describe_resolution(resolution: dict[str, Any]) -> str:
    scale = resolution.get("scale", 1.0)
    mpp = resolution.get("mpp")
    magnification = resolution.get("magnification")
    if mpp is not None:
        target = f"{mpp:g} microns per pixel"
    elif magnification is not None:
        target = f"the pixel size of a x{magnification:g} objective"
    else:
        target = "an unrecorded pixel size (set data.mpp or data.magnification when training)"
    return (
        f"the model was trained on images resized by scale {scale:g} from the source data, so its "
        f"input pixels have {target}."
    )


def read_metrics(path: Path, meta: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """Read and check a metrics.json written by `cervi-ray evaluate` for this checkpoint.

    Returns the path of the file read, which is `path` or `path`/metrics.json, and its content.
    """
    if path.is_dir():
        path = path / EVALUATE_METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"metrics file {path} not found. Pass the metrics.json that `cervi-ray evaluate` "
            "writes under <output>/<model>/."
        )
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"metrics file {path} is not valid JSON: {e}") from None
    if not isinstance(metrics, dict) or not isinstance(metrics.get("sets"), dict) or not metrics["sets"]:
        raise ValueError(
            f"metrics file {path} has no 'sets' entry with per-set metrics, so it was not written "
            "by `cervi-ray evaluate`. Pass the metrics.json that evaluate writes."
        )

    # NOTE: evaluate does not record the checkpoint path, so only these fields can reveal
    # metrics of another model.
    evaluated = metrics.get("meta", {})
    for key in ("model_kind", "epoch", "best_val_dice"):
        if key in evaluated and key in meta and evaluated[key] != meta[key]:
            raise ValueError(
                f"metrics file {path} was computed for a model with {key} {evaluated[key]!r}, but "
                f"the checkpoint has {key} {meta[key]!r}. Evaluate this checkpoint with "
                "`cervi-ray evaluate --checkpoint CKPT` and pass its metrics.json."
            )
    return path, metrics


def metrics_record(
    metrics: dict[str, Any] | None, path: Path | None, split: str, meta: dict[str, Any]
) -> dict[str, Any]:
    validation = {
        "epoch": meta.get("epoch"),
        "best_val_dice": meta.get("best_val_dice"),
        "metrics": {key: value for key, value in (meta.get("metrics") or {}).items() if key.startswith("val_")},
    }
    if metrics is None:
        return {
            "test_metrics_supplied": False,
            "note": (
                "Measure them with `cervi-ray evaluate --checkpoint <this bundle> --split test` and "
                "export again with --metrics <output>/model/metrics.json."
            ),
            "validation": validation,
        }
    return {
        "test_metrics_supplied": True,
        "split": split,
        "source_file": str(path.absolute()) if path is not None else None,
        "sets": metrics["sets"],
        "complexity": metrics.get("complexity"),
        "evaluated_model": metrics.get("meta"),
        "validation": validation,
    }
