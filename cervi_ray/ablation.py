"""The method's ablation table on our data: student variants, the teacher and smp baselines.

Rows, all trained on the same split with the same budgets:
  student (supervised, no distillation), + pruning, + distillation, + pruning + distillation,
  + distillation + TTA, + pruning + distillation + TTA, the teacher, U-Net, U-Net++, DeepLabV3.
"Pruning" here is structured pruning at prune.structured_keep_ratio followed by a fine-tune, so
the pruned rows really have fewer parameters and MACs. Every training run is a named Ray Train
run, so an interrupted ablation resumes where it stopped.
"""

import json
import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd
import ray.train

from cervi_ray.config import Config
from cervi_ray.pipeline import prepare_data
from cervi_ray.train.engine import TrainingJob
from cervi_ray.train.evaluate import evaluate_checkpoints
from cervi_ray.train.trainer import TrainingOutcome, ensure_ray, fit, standard_job
from cervi_ray.tune.prune import prune_into

logger = logging.getLogger(__name__)

TABLE_SET = "test_full"  # held-out images with cytoplasm and nucleus ground truth
NUCLEUS_SET = "edf_real_nucleus"  # held-out nucleus-only images


def _pruned_finetune(
    config: Config, rows: list[dict], student: TrainingOutcome, teacher: TrainingOutcome | None, label: str
) -> TrainingOutcome:
    """Structurally prune the student's best checkpoint, then fine-tune it as run `label`."""
    keep_ratio = config.prune.structured_keep_ratio
    if keep_ratio is None:
        raise ValueError("the ablation prunes structurally: set prune.structured_keep_ratio (e.g. 0.5)")
    folder = config.run_dir / "ablation" / f"{label}-start"
    if not (folder / "meta.json").is_file():
        with student.best_checkpoint.as_directory() as student_dir:
            prune_into(folder, Path(student_dir), {"kind": "structured", "keep_ratio": keep_ratio}, config)
    job = TrainingJob(
        label=label, model_kind="student", distill=teacher is not None, optim=config.prune.finetune,
        initial_weights=str(folder),
    )
    return fit(config, job, rows, None if teacher is None else teacher.best_checkpoint)


def train_variants(config: Config, rows: list[dict]) -> dict[str, ray.train.Checkpoint]:
    """Train (or resume) every model of the table; returns its best checkpoint by row name."""
    teacher = fit(config, standard_job(config, "teacher"), rows)
    plain = fit(config, TrainingJob(label="student-plain", model_kind="student", optim=config.student_train), rows)
    distilled = fit(config, standard_job(config, "student"), rows, teacher.best_checkpoint)
    plain_pruned = _pruned_finetune(config, rows, plain, None, "student-plain-pruned")
    distilled_pruned = _pruned_finetune(config, rows, distilled, teacher, "student-pruned")
    checkpoints = {
        "student": plain.best_checkpoint,
        "student + pruning": plain_pruned.best_checkpoint,
        "student + distillation": distilled.best_checkpoint,
        "student + pruning + distillation": distilled_pruned.best_checkpoint,
        "student + distillation + TTA": distilled.best_checkpoint,
        "student + pruning + distillation + TTA": distilled_pruned.best_checkpoint,
        "teacher (DeepLabV3+)": teacher.best_checkpoint,
    }
    names = {"unet": "U-Net", "unetplusplus": "U-Net++", "deeplabv3": "DeepLabV3"}
    for arch in config.ablation.baselines:
        outcome = fit(config, TrainingJob(label=arch, model_kind=arch, optim=config.teacher_train), rows)
        checkpoints[names[arch]] = outcome.best_checkpoint
    return checkpoints


def ablation_sets(rows: list[dict], split: str) -> dict[str, list[dict]]:
    held_out = [row for row in rows if row["split"] == split]
    sets = {
        TABLE_SET: [row for row in held_out if row["annotation"] == "full"],
        NUCLEUS_SET: [row for row in held_out if row["annotation"] == "nucleus"],
    }
    return {name: chosen for name, chosen in sets.items() if chosen}


def ablation_table(results: dict[str, dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for name, result in results.items():
        pixel = result["sets"][TABLE_SET]["pixel"]
        cell = pixel["cell"]
        complexity = result["complexity"]
        row = {
            "model": name,
            "sensitivity": cell["sensitivity"],
            "specificity": cell["specificity"],
            "accuracy": cell["accuracy"],
            "dice_cell": cell["dice"],
            "dice_cytoplasm": pixel["cytoplasm"]["dice"],
            "dice_nucleus": pixel["nucleus"]["dice"],
            "parameters": complexity["parameters"],
            "gmacs": complexity["macs"] / 1e9,
            "seconds_per_image": complexity["seconds_per_image_at_input_size"],
            "tta_views": complexity["tta_views"],
        }
        if NUCLEUS_SET in result["sets"]:
            row["dice_nucleus_edf_real"] = result["sets"][NUCLEUS_SET]["pixel"]["nucleus"]["dice"]
        rows.append(row)
    return pd.DataFrame(rows)


def markdown_table(table: pd.DataFrame, input_size: int) -> str:
    columns = [
        ("model", "model", None), ("sensitivity", "sensitivity", 4), ("specificity", "specificity", 4),
        ("accuracy", "accuracy", 4), ("dice_cell", "Dice (cell)", 4), ("dice_cytoplasm", "Dice (cytoplasm)", 4),
        ("dice_nucleus", "Dice (nucleus)", 4), ("dice_nucleus_edf_real", "Dice (nucleus, real EDF)", 4),
        ("parameters", "parameters (M)", None), ("gmacs", f"GMACs at {input_size}", 2),
        ("seconds_per_image", f"s / image at {input_size} (CPU)", 3),
    ]
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |", "| --- " * len(columns) + "|"]
    for _, row in table.iterrows():
        cells = []
        for key, _, digits in columns:
            value = row.get(key)
            if key == "parameters":
                cells.append(f"{value / 1e6:.2f}")
            elif value is None or (isinstance(value, float) and math.isnan(value)):
                cells.append("n/a")
            elif digits is None:
                cells.append(str(value))
            else:
                cells.append(f"{value:.{digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_ablation(config: Config) -> Path:
    """Train, evaluate and tabulate every row; writes ablation.md and ablation.parquet."""
    manifest = prepare_data(config)
    rows = manifest.to_dict(orient="records")
    ensure_ray(config.ray)
    checkpoints = train_variants(config, rows)

    folder = config.run_dir / "ablation"
    sets = ablation_sets(rows, config.eval.split)
    tta = {name: list(config.eval.tta) for name in checkpoints if name.endswith("+ TTA")}
    results = evaluate_checkpoints(
        checkpoints, sets, folder / "eval", config.eval.n_boot, max_overlays=1,
        latency_runs=config.eval.latency_runs, cpus_per_task=config.scaling.cpus_per_worker, tta=tta,
    )
    table = ablation_table(results)
    table.to_parquet(folder / "ablation.parquet", index=False)
    held_out = {name: len(chosen) for name, chosen in sets.items()}
    text = (
        f"# Ablation: {config.run.name}\n\n"
        f"Held-out images: {json.dumps(held_out)} (split {config.eval.split!r} of {config.splits_file}). "
        "Pixel-level metrics on the images with cytoplasm and nucleus ground truth; sensitivity, "
        "specificity and accuracy are for the cell foreground. Time per image is the median CPU "
        f"forward pass at {config.model.input_size} x {config.model.input_size} with "
        f"{config.scaling.cpus_per_worker} thread(s), all TTA views included.\n\n"
        + markdown_table(table, config.model.input_size)
    )
    path = folder / "ablation.md"
    path.write_text(text)
    add_to_report(config.run_dir / "report.md", text)
    logger.info("ablation table: %s", path)
    return path


def add_to_report(report: Path, ablation_markdown: str) -> None:
    """Put the ablation table into the run report, replacing an earlier one; no report, no-op."""
    if not report.is_file():
        return
    marker = "\n## Ablation\n"
    text = report.read_text()
    if marker in text:
        text = text[: text.index(marker)]
    body = ablation_markdown.split("\n", 1)[1]  # drop the document title
    report.write_text(text.rstrip("\n") + "\n" + marker + body)
