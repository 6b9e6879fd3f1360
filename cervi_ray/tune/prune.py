"""Pruning search on Ray Tune: magnitude sparsities and a structured variant, each fine-tuned.

Every candidate is a trial. It prunes the student, measures validation Dice before and after a
short fine-tune (optionally with the distillation loss still on), and saves the fine-tuned model
with its masks or reduced shapes so it reloads exactly. The search keeps raising the magnitude
threshold while validation Dice stays within `prune.tolerance` of the unpruned student and picks
the sparsest candidate reached that way.
"""

import gzip
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import ray
import ray.train
import ray.tune
import torch
from ray.tune import CheckpointConfig, FailureConfig, RunConfig, TuneConfig, Tuner

from cervi_ray.checkpoint import MODEL_FILE, load_model, read_meta, save_checkpoint
from cervi_ray.config import Config
from cervi_ray.models.complexity import count_parameters, time_per_image
from cervi_ray.pruning.magnitude import (
    apply_masks,
    global_threshold,
    magnitude_masks,
    prunable_parameters,
    save_masks,
    sparsity_summary,
)
from cervi_ray.pruning.structured import parameter_shapes, prune_student_structured
from cervi_ray.storage import resolve_storage, storage_retry_policy
from cervi_ray.tracking import sweep_tracker
from cervi_ray.train.engine import TrainingJob, load_validation_pairs, run_training
from cervi_ray.train.steps import validate
from cervi_ray.tune.session import TuneSession

logger = logging.getLogger(__name__)

MASKS_FILE = "masks.safetensors"


def candidates(config: Config) -> list[dict[str, Any]]:
    prune = config.prune
    for sparsity in prune.sparsities:
        if not 0.0 < sparsity < 1.0:
            raise ValueError(f"prune.sparsities must lie in (0, 1), got {sparsity}")
    found = [{"kind": "magnitude", "sparsity": float(s)} for s in sorted(prune.sparsities)]
    if prune.structured_keep_ratio is not None:
        found.append({"kind": "structured", "keep_ratio": float(prune.structured_keep_ratio)})
    if not found:
        raise ValueError("the pruning search has no candidates: set prune.sparsities or prune.structured_keep_ratio")
    return found


def prune_into(folder: Path, student_dir: Path, candidate: dict[str, Any], config: Config) -> dict[str, Any]:
    """Prune the student of `student_dir` and save it as a checkpoint folder; returns facts."""
    model, meta = load_model(student_dir)
    facts: dict[str, Any] = {"kind": candidate["kind"]}
    masks = None
    if candidate["kind"] == "magnitude":
        params = prunable_parameters(model, config.prune.include_norm, config.prune.include_output)
        threshold = global_threshold(params, candidate["sparsity"])
        masks = magnitude_masks(params, threshold)
        apply_masks(model, masks)
        facts.update(threshold=float(threshold), target_sparsity=candidate["sparsity"])
        meta["pruning"] = {"kind": "magnitude", "threshold": float(threshold), "sparsity": candidate["sparsity"]}
    else:
        summary = prune_student_structured(model, candidate["keep_ratio"])
        facts.update(keep_ratio=candidate["keep_ratio"])
        meta["pruned_shapes"] = parameter_shapes(model)
        meta["pruning"] = {"kind": "structured", "keep_ratio": candidate["keep_ratio"],
                           "parameters_before": summary.get("parameters_before"),
                           "parameters_after": summary.get("parameters_after")}
    for key in ("epoch", "best_val_dice", "stale_validations", "history", "train_seconds", "stopped", "metrics"):
        meta.pop(key, None)
    save_checkpoint(folder, model, meta)
    if masks is not None:
        save_masks(masks, folder / MASKS_FILE)
    return facts


def model_facts(folder: Path, input_size: int, latency_runs: int) -> dict[str, Any]:
    """Parameters (total and non-zero), weight-file sizes and CPU time per image of a checkpoint."""
    model, _ = load_model(folder)
    summary = sparsity_summary(model)
    weights = (folder / MODEL_FILE).read_bytes()
    return {
        "parameters": count_parameters(model),
        "nonzero_parameters": summary["nonzero_parameters"],
        "sparsity": summary["prunable_sparsity"],
        "file_bytes": len(weights),
        # Zeros only shrink a file once compressed: the gzip size shows the storage gain.
        "gzip_bytes": len(gzip.compress(weights, compresslevel=6)),
        "seconds_per_image": time_per_image(model, input_size, runs=latency_runs),
    }


def candidate_trainable(
    trial: dict[str, Any], config_tree: dict, rows: list[dict], student, teacher,
    tracking_parent_run_id: str | None = None,
) -> None:
    """Prune, validate, fine-tune and report one candidate inside a Tune trial.

    Its MLflow run nests under `tracking_parent_run_id`.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = Config.model_validate(config_tree)
    candidate = trial["candidate"]
    torch.set_num_threads(config.prune.cpus_per_trial)
    session = TuneSession(use_gpu=config.prune.gpus_per_trial > 0)
    work = Path(tempfile.mkdtemp(prefix="cervi_ray_prune_"))
    with student.as_directory() as student_dir:
        facts = prune_into(work, Path(student_dir), candidate, config)

    # Validation Dice of the pruned model before any fine-tuning, at the training scale.
    pruned, _ = load_model(work)
    val_pairs = load_validation_pairs(config, [row for row in rows if row["split"] == "val"])
    before = validate(pruned, val_pairs, session.device, config.data.label_mode)["val_dice"]
    facts["val_dice_before_finetune"] = before

    job = TrainingJob(
        label=f"prune {candidate}", model_kind="student", distill=config.prune.distill,
        optim=config.prune.finetune, initial_weights=str(work),
        masks_file=str(work / MASKS_FILE) if candidate["kind"] == "magnitude" else None,
        extra_meta={"prune_facts": facts}, tracking_parent_run_id=tracking_parent_run_id,
    )
    if job.distill:
        with teacher.as_directory() as teacher_dir:
            run_training(config, job, rows, _FactsSession(session, facts), teacher_dir=Path(teacher_dir))
    else:
        run_training(config, job, rows, _FactsSession(session, facts))


class _FactsSession:
    """Adds the candidate's pruning facts to every report, so the results table has them."""

    def __init__(self, inner: TuneSession, facts: dict[str, Any]):
        self.inner, self.facts = inner, facts
        self.rank, self.world_size, self.device = inner.rank, inner.world_size, inner.device
        self.mlflow_starter, self.tracking_suffix = inner.mlflow_starter, inner.tracking_suffix

    def restored_checkpoint(self):
        return self.inner.restored_checkpoint()

    def report(self, metrics, checkpoint_dir):
        self.inner.report({**metrics, **{f"prune_{k}": v for k, v in self.facts.items()}}, checkpoint_dir)

    def wrap_model(self, model):
        return model


def reference_dice(config: Config, rows: list[dict], student_dir: Path) -> float:
    """Validation Dice of the unpruned student, measured the same way as every candidate."""
    model, _ = load_model(student_dir)
    pairs = load_validation_pairs(config, [row for row in rows if row["split"] == "val"])
    return validate(model, pairs, torch.device("cpu"), config.data.label_mode)["val_dice"]


def run_prune_search(
    config: Config, rows: list[dict], student: ray.train.Checkpoint, teacher: ray.train.Checkpoint | None
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Run (or restore) the search; returns the candidate table and the selection."""
    if config.prune.distill and teacher is None:
        raise ValueError("prune.distill is on, so the search needs a teacher checkpoint (prune.teacher_checkpoint)")
    path, filesystem = resolve_storage(
        config.storage_path, config.run.storage_endpoint_url, storage_retry_policy(config.run)
    )
    name = f"{config.run.name}-prune-{config.prune.name}"
    experiment = f"{path.rstrip('/')}/{name}"
    tracker = sweep_tracker(config, name, "prune")
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(
            candidate_trainable, config_tree=config.model_dump(mode="json"), rows=rows,
            student=student, teacher=teacher, tracking_parent_run_id=tracker.run_id,
        ),
        {"cpu": config.prune.cpus_per_trial, "gpu": config.prune.gpus_per_trial},
    )
    if Tuner.can_restore(experiment, storage_filesystem=filesystem):
        tuner = Tuner.restore(experiment, trainable=trainable, resume_errored=True, storage_filesystem=filesystem)
    else:
        tuner = Tuner(
            trainable,
            param_space={"candidate": ray.tune.grid_search(candidates(config))},
            tune_config=TuneConfig(max_concurrent_trials=config.prune.max_concurrent_trials),
            run_config=RunConfig(
                name=name, storage_path=path, storage_filesystem=filesystem,
                failure_config=FailureConfig(max_failures=config.prune.max_failures),
                checkpoint_config=CheckpointConfig(
                    num_to_keep=1, checkpoint_score_attribute="val_dice", checkpoint_score_order="max"
                ),
            ),
        )
    with tracker:
        grid = tuner.fit()

        with student.as_directory() as student_dir:
            reference = reference_dice(config, rows, Path(student_dir))
            unpruned = model_facts(Path(student_dir), config.model.input_size, config.eval.latency_runs)
        table = candidate_table(grid, config, reference, unpruned)
        selection = select(table, reference, config.prune.tolerance)
        tracker.log_text(table.to_csv(index=False), "candidates.csv")
        tracker.log_text(json.dumps(selection, indent=2, default=str), "selection.json")
    return table, selection


def candidate_table(grid, config: Config, reference: float, unpruned: dict[str, Any]) -> pd.DataFrame:
    rows = [{"candidate": "unpruned", "kind": "none", "threshold": 0.0, "val_dice_before_finetune": reference,
             "val_dice_after_finetune": reference, "status": "ok", "checkpoint": "", **unpruned}]
    for result in grid:
        candidate = result.config["candidate"]
        row: dict[str, Any] = {"candidate": json.dumps(candidate, sort_keys=True), "kind": candidate["kind"],
                               "status": "error" if result.error is not None else "ok"}
        checkpoint = result.get_best_checkpoint("val_dice", "max") if result.best_checkpoints else None
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                meta = read_meta(folder)
                facts = meta.get("prune_facts", {})
                row.update(
                    threshold=facts.get("threshold"),
                    val_dice_before_finetune=facts.get("val_dice_before_finetune"),
                    val_dice_after_finetune=meta.get("best_val_dice"),
                    **model_facts(Path(folder), config.model.input_size, config.eval.latency_runs),
                )
            row["checkpoint"] = checkpoint.path
        rows.append(row)
    return pd.DataFrame(rows)


def select(table: pd.DataFrame, reference: float, tolerance: float) -> dict[str, Any]:
    """Pick the sparsest magnitude candidate reached while every smaller one stayed in tolerance."""
    magnitude = table[table["kind"] == "magnitude"].sort_values("sparsity")
    chosen = None
    for _, row in magnitude.iterrows():
        dice = row.get("val_dice_after_finetune")
        if row["status"] != "ok" or dice is None or pd.isna(dice) or dice < reference - tolerance:
            break
        chosen = row
    structured = table[(table["kind"] == "structured") & (table["status"] == "ok")]
    selection: dict[str, Any] = {"reference_val_dice": reference, "tolerance": tolerance}
    if chosen is not None:
        selection["magnitude"] = {key: _plain(chosen[key]) for key in
                                  ("candidate", "threshold", "sparsity", "val_dice_after_finetune", "checkpoint")}
    if len(structured):
        row = structured.iloc[0]
        within = row["val_dice_after_finetune"] >= reference - tolerance
        selection["structured"] = {key: _plain(row[key]) for key in
                                   ("candidate", "parameters", "seconds_per_image", "val_dice_after_finetune", "checkpoint")}
        selection["structured"]["within_tolerance"] = bool(within)
    return selection


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def write_prune_outputs(folder: Path, table: pd.DataFrame, selection: dict[str, Any]) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"table": folder / "candidates.parquet", "markdown": folder / "prune.md", "selection": folder / "selection.json"}
    table.to_parquet(paths["table"], index=False)
    paths["selection"].write_text(json.dumps(selection, indent=2, default=str))
    columns = ["candidate", "threshold", "sparsity", "nonzero_parameters", "parameters", "file_bytes",
               "gzip_bytes", "val_dice_before_finetune", "val_dice_after_finetune", "seconds_per_image", "status"]
    lines = ["| " + " | ".join(columns) + " |", "| --- " * len(columns) + "|"]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(_cell(row.get(column)) for column in columns) + " |")
    paths["markdown"].write_text("\n".join(lines) + "\n")
    return paths


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)



