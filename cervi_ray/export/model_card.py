"""MODEL_CARD.md of a model bundle: intended use, training data, metrics, limitations, loading."""

from __future__ import annotations

from typing import Any

from cervi_ray.data.catalog import DATASETS

# Source kinds whose images are grey-scale extended-depth-of-field (EDF) composites.
_GREY_EDF_KINDS = frozenset({"isbi2015", "isbi2014_train45", "isbi2014_test90", "isbi2014_edf_real"})
_MODEL_NAMES = {
    "student": "CerviSegNet student (Swin-based)",
    "teacher": "DeepLabV3+ teacher",
    "unet": "U-Net baseline",
    "unetplusplus": "U-Net++ baseline",
    "deeplabv3": "DeepLabV3 baseline",
}
_METHOD_CITATION = "CerviSegNet-DistillPlus: Kang and Li, IEEE Access 2024"


def render_model_card(
    meta: dict[str, Any],
    labels: dict[str, Any],
    preprocessing: dict[str, Any],
    metrics: dict[str, Any],
    parameters: int,
    onnx: dict[str, Any] | None,
) -> str:
    """Render MODEL_CARD.md from the bundle's meta, labels, preprocessing and metrics records."""
    sections = [
        _header(meta, parameters),
        _intended_use(),
        _training_data(meta),
        _input_section(preprocessing),
        _metrics_section(metrics),
        _limitations(meta, preprocessing),
        _loading(labels, preprocessing, onnx),
    ]
    return "\n\n".join(sections) + "\n"


def _header(meta: dict[str, Any], parameters: int) -> str:
    kind = meta["model_kind"]
    bundle = meta.get("bundle", {})
    rows = [
        ("model", _MODEL_NAMES.get(kind, kind)),
        ("model kind (meta.json)", f"`{kind}`"),
        ("classes", ", ".join(f"{value} {name}" for name, value in meta["label_map"].items())),
        ("parameters", f"{parameters:,}"),
        ("distilled", _yes_no(meta.get("distilled"))),
        ("pruning", _pruning(meta)),
        ("epoch of these weights", str(meta.get("epoch", "not recorded"))),
        ("code version", str(meta.get("code_version", "not recorded"))),
        ("source checkpoint", f"`{bundle.get('source_checkpoint', 'not recorded')}`"),
        ("bundle created", str(bundle.get("created", "not recorded"))),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return (
        f"# Model card: {_MODEL_NAMES.get(kind, kind)}\n\n"
        "Semantic segmentation of cervical-cytology images into background, cytoplasm and nucleus, "
        f"from cervi_ray ({_METHOD_CITATION}).\n\n| field | value |\n| --- | --- |\n{table}"
    )


def _yes_no(value: bool | None) -> str:
    if value is None:
        return "not recorded"
    return "yes" if value else "no"


def _pruning(meta: dict[str, Any]) -> str:
    pruning = meta.get("pruning")
    if not pruning and "pruned_shapes" not in meta:
        return "none"
    if isinstance(pruning, dict):
        described = ", ".join(
            f"{key} {value}" for key, value in pruning.items() if isinstance(value, (str, int, float))
        )
        return described or "yes"
    return "structured (layer shapes in meta.json `pruned_shapes`)"


def _intended_use() -> str:
    return (
        "## Intended use\n\n"
        "Research on, and decision support for, the segmentation of cells and nuclei in cervical "
        "cytology (Pap smear) images: measuring nuclei and cytoplasm, counting cells, and "
        "pre-selecting regions for a cytologist to review.\n\n"
        "**This model is not a diagnostic device.** It has not been clinically validated and "
        "carries no regulatory clearance. Do not use its output to diagnose, screen or treat a "
        "patient. Every result used for a clinical decision must be reviewed by a qualified "
        "cytologist or pathologist."
    )


def _training_data(meta: dict[str, Any]) -> str:
    data = meta["config"]["data"]
    lines = ["## Training data", ""]
    for source in data["sources"]:
        use = "evaluation only" if source.get("split") == "test" else "training, validation and test split"
        lines.append(f"- `{source['name']}` (reader `{source['kind']}`): {use}")
    split = data.get("split", {})
    lines += [
        "",
        f"Label mode `{meta['label_mode']}`. Images are split by group (one frame, image or "
        f"slide), seed {split.get('seed', 'not recorded')}, test fraction "
        f"{split.get('test_fraction', 'not recorded')}, validation fold {split.get('fold', 'not recorded')} "
        "of the splits file. The test images were not used for training or model selection.",
        "",
        "Cite the data sets used:",
        "",
    ]
    kinds = {source["kind"] for source in data["sources"]}
    cited = [dataset for dataset in DATASETS if kinds & set(dataset.kinds)]
    # Data sets that share a publication (ISBI 2014 and 2015) get one line.
    names_by_citation: dict[str, list[str]] = {}
    for dataset in cited:
        names_by_citation.setdefault(dataset.citation, []).append(dataset.name)
    for citation, names in names_by_citation.items():
        lines.append(f"- {' and '.join(names)}: {citation}.")
    uncited = sorted(kinds - {kind for dataset in cited for kind in dataset.kinds})
    if uncited:
        lines.append(f"- Own data (readers {', '.join(uncited)}): cite as its owners require.")
    return "\n".join(lines)


def _input_section(preprocessing: dict[str, Any]) -> str:
    normalisation = preprocessing["normalisation"]
    resolution = preprocessing["resolution"]
    size = preprocessing["size"]
    return (
        "## Input\n\n"
        f"- {preprocessing['input']['channels']} channels in {preprocessing['input']['channel_order']} "
        f"order, {preprocessing['input']['layout']} float32. Grey-scale images: "
        f"{preprocessing['grayscale']}.\n"
        f"- Normalisation: {normalisation['formula']} with mean {normalisation['mean']} and std "
        f"{normalisation['std']} (ImageNet statistics).\n"
        f"- Resolution: {resolution['description']}\n"
        f"- Size: any height and width; the model reflect-pads to a multiple of "
        f"{size['padding_multiple']} and crops its output back. Trained on "
        f"{size['training_input']}. ONNX graphs need sides of at least {size['min_side_onnx']} pixels.\n\n"
        "preprocessing.json holds these values in machine-readable form."
    )


def _metrics_section(metrics: dict[str, Any]) -> str:
    lines = ["## Metrics", ""]
    validation = metrics.get("validation", {})
    if validation.get("best_val_dice") is not None:
        lines.append(
            f"Validation: best mean Dice {validation['best_val_dice']:.3f} during training "
            "(the split used for model selection, so it is optimistic).\n"
        )
    if not metrics.get("test_metrics_supplied"):
        lines.append(f"**No test metrics were supplied.** {metrics['note']}")
        return "\n".join(lines)

    lines += [
        f"Held-out `{metrics['split']}` split, pixel-level Dice at native resolution "
        "(`cervi-ray evaluate`; 'cell' is the cytoplasm and nucleus foreground together). "
        "Empty cells: not annotated in that set.",
        "",
        "| set | images | nucleus | cytoplasm | cell | nucleus, per-image mean (95 % CI) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for set_name, result in metrics["sets"].items():
        pixel = result.get("pixel", {})
        per_image = result.get("per_image", {}).get("nucleus", {}).get("dice", {})
        images = len(result.get("images", [])) or per_image.get("n", "")
        lines.append(
            f"| {set_name} | {images} | {_rate(pixel, 'nucleus')} | {_rate(pixel, 'cytoplasm')} | "
            f"{_rate(pixel, 'cell')} | {_interval(per_image)} |"
        )
    lines += ["", "metrics.json holds every rate, the confusion counts and the per-image records."]
    return "\n".join(lines)


def _rate(pixel: dict[str, Any], class_name: str) -> str:
    value = pixel.get(class_name, {}).get("dice")
    return "" if value is None else f"{value:.3f}"


def _interval(summary: dict[str, Any]) -> str:
    if summary.get("mean") is None:
        return ""
    if summary.get("ci_low") is None or summary.get("ci_high") is None:
        return f"{summary['mean']:.3f}"
    return f"{summary['mean']:.3f} ({summary['ci_low']:.3f} to {summary['ci_high']:.3f})"


def _limitations(meta: dict[str, Any], preprocessing: dict[str, Any]) -> str:
    data = meta["config"]["data"]
    kinds = {source["kind"] for source in data["sources"]}
    lines = [
        "## Limitations",
        "",
        "- Small training data: the public cervical-cytology segmentation sets hold tens to a few "
        "hundred annotated images, far fewer than the variety of stains, scanners and "
        "preparations in practice.",
    ]
    if kinds <= _GREY_EDF_KINDS:
        lines.append(
            "- Grey-scale EDF images only: trained on grey-scale extended-depth-of-field composites "
            "of the ISBI challenges. Colour slides, single focal planes and other stains were not "
            "seen in training."
        )
    lines += [
        f"- Resolution: {preprocessing['resolution']['description']} Images at another "
        "resolution must be resized to match, or nuclei and cells will be mis-sized or missed.",
        "- Unannotated cells: some images leave cells unannotated (the ISBI 2015 frames do). Those "
        "cells count as background, so the model may learn to miss cells, and whole-image "
        "metrics count correct predictions on them as false positives.",
        "- No clinical validation: results come from small public research sets, not from a "
        "prospective study, and say nothing about diagnostic accuracy.",
    ]
    if meta["label_mode"] == "nucleus":
        lines.append("- Nucleus-only labels: cytoplasm and background are one class.")
    return "\n".join(lines)


def _loading(labels: dict[str, Any], preprocessing: dict[str, Any], onnx: dict[str, Any] | None) -> str:
    label_text = ", ".join(f"{value} = {name}" for name, value in labels["label_map"].items())
    lines = [
        "## How to load",
        "",
        "PyTorch with cervi_ray (the bundle is also a checkpoint folder):",
        "",
        "```python",
        "import numpy as np, torch",
        "from cervi_ray.checkpoint import load_model",
        "from cervi_ray.data.dataset import rescale, to_tensor",
        "",
        "model, meta = load_model('path/to/bundle')",
        "scale = meta['training_resolution']['scale']",
        "image, _ = rescale(rgb_uint8_image, None, scale)  # (H, W, 3) uint8; grey: np.repeat(gray[..., None], 3, axis=2)",
        "with torch.no_grad():",
        "    logits = model(to_tensor(image).unsqueeze(0))  # (1, K, H, W)",
        f"labels = logits.argmax(1)[0].numpy()  # {label_text}",
        "```",
        "",
        "`cervi-ray evaluate --checkpoint BUNDLE` and slide scoring (scoring.checkpoint) load the "
        "bundle folder like a checkpoint folder.",
    ]
    if onnx:
        normalisation = preprocessing["normalisation"]
        lines += [
            "",
            "ONNX Runtime, without cervi_ray or PyTorch:",
            "",
            "```python",
            "import numpy as np, onnxruntime",
            "",
            "# image: (H, W, 3) uint8 RGB, resized to the training resolution as above",
            "session = onnxruntime.InferenceSession('path/to/bundle/model.onnx', providers=['CPUExecutionProvider'])",
            f"mean = np.array({normalisation['mean']}, dtype=np.float32)",
            f"std = np.array({normalisation['std']}, dtype=np.float32)",
            "x = ((image.astype(np.float32) / 255 - mean) / std).transpose(2, 0, 1)[None]  # (1, 3, H, W)",
            "logits = session.run(['logits'], {'image': x})[0]  # (1, K, H, W)",
            "labels = logits.argmax(1)[0]",
            "```",
            "",
        ]
        for name, record in onnx["files"].items():
            check = record["check"]
            views = f", TTA views {', '.join(record['tta_transforms'])}" if "tta_transforms" in record else ""
            lines.append(
                f"- `{name}`: output `{record['output']}`{views}. ONNX Runtime matched PyTorch with "
                f"a max abs difference of {check['max_abs_diff']:.2g} and the same argmax on "
                f"{100 * check['argmax_agreement']:.2f} % of pixels."
            )
        lines.append(
            f"- Exporter: {onnx['exporter']}, opset {onnx['opset_version']}, torch "
            f"{onnx['torch_version']}. Batch, height and width are dynamic."
        )
    return "\n".join(lines)
