"""The trackers of the project's runs: training, the demo, sweeps and scoring."""

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from cervi_ray.config import Config
from cervi_ray.tracking.store import describe_model, file_sha256, redact, run_tags
from cervi_ray.tracking.tracker import RunTracker


def training_tracker(config: Config, job: Any, session: Any) -> RunTracker:
    """Start the tracker of one training run (an engine TrainingJob); other ranks than 0 get a no-op one.

    The session may set `mlflow_starter`, a RunStarter, and the Ray sessions set one that goes
    through setup_mlflow. Tune sessions also set `tracking_suffix` to the trial id, so every trial
    has its own run and folder. A session that restores a checkpoint reopens the MLflow run of the
    same name and storage path.
    """
    suffix = getattr(session, "tracking_suffix", None)
    run_name = f"{config.run.name}-{job.label}" + (f"-{suffix}" if suffix else "")
    tracker = RunTracker(
        config, run_name, run_tags(config, job.label, describe_model(config, job.model_kind)),
        run_key=f"{config.storage_path}/{run_name}",
        parent_run_id=job.tracking_parent_run_id,
        starter=getattr(session, "mlflow_starter", None),
        enabled=session.rank == 0,
    )
    if session.rank != 0 or not config.tracking.enabled:
        return tracker
    job_fields = job.model_dump(
        mode="json", include={"label", "model_kind", "distill", "initial_weights", "masks_file"}
    )
    params = {**config.model_dump(mode="json"), "job": job_fields}
    return tracker.start(params, resume=session.restored_checkpoint() is not None)


def pipeline_tracker(config: Config) -> RunTracker:
    """Start the demo's parent run: the training runs nest under it, the report is its artifact."""
    model = f"{describe_model(config, 'teacher')}; {describe_model(config, 'student')}"
    tracker = RunTracker(config, config.run.name, run_tags(config, "demo", model))
    return tracker.start(config.model_dump(mode="json"))


def log_pipeline_outputs(tracker: RunTracker, run_dir: Path) -> None:
    """Upload the demo's report, curves, config, splits file, summary and metrics files; log headline metrics."""
    if not tracker.active:
        return
    # The parent run starts before the demo writes the splits file on its first run.
    tracker.set_tags({"split_file_sha256": file_sha256(tracker.config.splits_file) or "missing"})
    tracker.log_artifacts([
        run_dir / "report.md", run_dir / "summary.json", run_dir / "config.yaml", tracker.config.splits_file,
        *sorted(run_dir.glob("curves_*.png")),
    ])
    tracker.log_artifacts([run_dir / "eval" / "baselines.json"], "eval")
    for metrics_file in sorted((run_dir / "eval").glob("*/metrics.json")):
        tracker.log_artifacts([metrics_file], f"eval/{metrics_file.parent.name}")
    summary_file = run_dir / "summary.json"
    if summary_file.is_file():
        tracker.log_metrics(summary_metrics(json.loads(summary_file.read_text())), step=0)


def summary_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """Return the headline numbers of the demo's summary.json.

    They are the best validation Dice of each training and the evaluation Dice per model, set and class.
    """
    metrics: dict[str, float] = {}
    for task, facts in summary.get("training", {}).items():
        if isinstance(facts.get("best_val_dice"), (int, float)):
            metrics[f"{task}/best_val_dice"] = float(facts["best_val_dice"])
    for model, sets in summary.get("results", {}).items():
        for set_name, result in sets.items():
            if not isinstance(result, Mapping):
                continue
            for class_name, rates in (result.get("pixel") or {}).items():
                dice = rates.get("dice") if isinstance(rates, Mapping) else None
                if isinstance(dice, (int, float)) and math.isfinite(dice):
                    metrics[f"{model}/{set_name}/dice_{class_name}"] = float(dice)
    return metrics


def sweep_tracker(config: Config, name: str, task: Literal["cv", "prune"]) -> RunTracker:
    """Start the parent run of a Tune sweep on the driver; its trials nest under it.

    Starting it before the trials also creates the store and the experiment once, so parallel
    trials do not race to create them.
    """
    tracker = RunTracker(config, name, run_tags(config, task))
    return tracker.start(config.model_dump(mode="json"))


def scoring_tracker(config: Config) -> RunTracker:
    """Start the run of one scoring job; parameters are the scoring section only."""
    scoring = config.scoring
    tags = run_tags(config, "score", with_data=False)
    tags.update(
        checkpoint=redact(scoring.checkpoint or "in-memory model"),
        input=redact(scoring.input or ""),
        output=redact(scoring.output or ""),
    )
    tracker = RunTracker(config, f"{config.run.name}-score", tags)
    return tracker.start({"scoring": scoring.model_dump(mode="json")})


def scoring_metrics(report: Any) -> dict[str, float]:
    """Return the counts and throughput of a ScoringReport (cervi_ray.scoring.pipeline)."""
    metrics = {
        "slides_listed": report.slides_listed,
        "slides_already_done": report.slides_already_done,
        "tiles_scored": report.tiles_scored,
        "seconds": report.seconds,
        "tiles_per_second": report.tiles_scored / report.seconds if report.seconds > 0 else 0.0,
    }
    metrics.update({f"slides_{status}": count for status, count in report.statuses.items()})
    return {key: float(value) for key, value in metrics.items()}
