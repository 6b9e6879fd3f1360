"""The Markdown run report: data, training, model size and speed, metrics, curves, overlays."""

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SET_TITLES = {
    "isbi2015": "ISBI 2015 real EDF frames, held out (cytoplasm and nucleus ground truth)",
    "isbi2014_train45": "ISBI 2014 train45 composites, held out",
    "isbi2014_test90": "ISBI 2014 test90 composites",
    "isbi2014_edf_real": "real EDF images EDF000-EDF003 (ISBI 2014), nucleus-only ground truth",
}
SET_NOTES = {
    "isbi2015": (
        "Not every cell of these frames is annotated, and predictions on unannotated cells "
        "count as false positives here, so whole-image pixel metrics are pessimistic."
    ),
    "isbi2014_edf_real": (
        "Only nuclei are annotated: cytoplasm and cell metrics are undefined and only the "
        "nucleus is scored."
    ),
}


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _per_image(entry: Mapping[str, Any] | None) -> str:
    if not entry or entry.get("mean") is None:
        return "n/a"
    return f"{entry['mean']:.3f} [{_fmt(entry['ci_low'])}, {_fmt(entry['ci_high'])}]"


def metrics_table(set_results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One row per model: pixel-level Dice per class, cell rates and per-image Dice with CI."""
    header = (
        "| model | cytoplasm Dice | nucleus Dice | cell Dice | cell sensitivity | cell specificity "
        "| cell accuracy | nucleus Dice per image, mean [95% CI] |"
    )
    lines = [header, "| --- " * 8 + "|"]
    for model, result in set_results.items():
        pixel = result["pixel"]
        per_image = result["per_image"]
        cyto, nucleus, cell = (pixel.get(name, {}) for name in ("cytoplasm", "nucleus", "cell"))
        lines.append(
            f"| {model} | {_fmt(cyto.get('dice'))} | {_fmt(nucleus.get('dice'))} | {_fmt(cell.get('dice'))} "
            f"| {_fmt(cell.get('sensitivity'))} | {_fmt(cell.get('specificity'))} "
            f"| {_fmt(cell.get('accuracy'))} | {_per_image(per_image.get('nucleus', {}).get('dice'))} |"
        )
    return lines


def headline_lines(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Nucleus Dice on the real EDF images and cell/nucleus Dice on held-out frames per model."""
    lines = []
    for set_name, label in (("isbi2014_edf_real", "EDF real images, nucleus Dice"),
                            ("isbi2015", "held-out ISBI 2015 frames, nucleus / cytoplasm / cell Dice")):
        parts = []
        for model, per_set in results.items():
            pixel = per_set.get(set_name, {}).get("pixel")
            if not pixel:
                continue
            if set_name == "isbi2014_edf_real":
                parts.append(f"{model} {_fmt(pixel['nucleus']['dice'])}")
            else:
                parts.append(
                    f"{model} {_fmt(pixel['nucleus']['dice'])} / {_fmt(pixel['cytoplasm']['dice'])} "
                    f"/ {_fmt(pixel['cell']['dice'])}"
                )
        if parts:
            lines.append(f"- {label}: " + ", ".join(parts))
    return lines


def write_report(path: str | Path, context: Mapping[str, Any]) -> Path:
    """Render the run report. `context` keys: title, facts, split_counts, training, models,
    results ({model: {set: metrics}}), curves ({task: png}), overlays ({model: {set: [png]}})."""
    path = Path(path)
    root = path.parent
    lines = [f"# {context['title']}", ""]
    lines += [f"- {key}: {value}" for key, value in context["facts"].items()]

    lines += ["", "## Headline", ""] + headline_lines(context["results"])

    lines += ["", "## Data", "", "| source | train | val | test |", "| --- | --- | --- | --- |"]
    for source, counts in context["split_counts"].items():
        lines.append(f"| {source} | {counts.get('train', 0)} | {counts.get('val', 0)} | {counts.get('test', 0)} |")

    lines += ["", "## Training", "", "| model | epochs run | best epoch | best validation Dice | stopped by | wall time (s) |",
              "| --- | --- | --- | --- | --- | --- |"]
    for task, summary in context["training"].items():
        lines.append(
            f"| {task} | {summary['epochs_run']} | {summary['best_epoch']} | {_fmt(summary['best_val_dice'])} "
            f"| {summary['stopped_by']} | {summary['seconds']:.0f} |"
        )
    for task, curve in context["curves"].items():
        lines += ["", f"![{task} training curves]({Path(curve).relative_to(root)})"]

    lines += ["", "## Model size and speed", "",
              "| model | parameters (M) | GMACs per image | input side | seconds per image | seconds per evaluation image |",
              "| --- | --- | --- | --- | --- | --- |"]
    for model, info in context["models"].items():
        lines.append(
            f"| {model} | {info['parameters'] / 1e6:.2f} | {info['macs'] / 1e9:.2f} | {info['input_size']} "
            f"| {info['seconds_per_image_at_input_size']:.3f} | {_fmt(info.get('seconds_per_eval_image'))} |"
        )
    lines += ["", context.get("speed_note", "")]

    lines += ["", "## Metrics", "",
              "Pixel-level metrics are summed over all images of a set; per-image means come with a "
              "bootstrap 95 % confidence interval over images. Images whose ground truth lacks a class "
              "are left out of that class's per-image Dice but their false positives count in the "
              "pixel-level figures."]
    set_names = sorted({name for per_set in context["results"].values() for name in per_set})
    for set_name in set_names:
        per_model = {model: per_set[set_name] for model, per_set in context["results"].items() if set_name in per_set}
        count = len(next(iter(per_model.values()))["images"])
        lines += ["", f"### {SET_TITLES.get(set_name, set_name)}: {count} images", ""]
        if set_name in SET_NOTES:
            lines += [SET_NOTES[set_name], ""]
        lines += metrics_table(per_model)

    lines += ["", "## Overlays", "", "Each overlay: image, ground truth, prediction (green cytoplasm, magenta nucleus).", ""]
    for model, per_set in context["overlays"].items():
        for set_name, images in per_set.items():
            for image in images:
                lines.append(f"![{model} {set_name}]({Path(image).relative_to(root)})")
    lines += ["", context.get("citation", ""), ""]

    path.write_text("\n".join(lines))
    return path
