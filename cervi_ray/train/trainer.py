"""Build and run the Ray Train TorchTrainer for teacher training or distillation."""

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from cervi_ray.checkpoint import read_meta
from cervi_ray.config import Config, RayConfig
from cervi_ray.storage import resolve_storage, storage_retry_policy
from cervi_ray.train.engine import TrainingJob
from cervi_ray.train.loop import train_loop_per_worker

logger = logging.getLogger(__name__)

Task = Literal["teacher", "student"]
LOOPBACK = "127.0.0.1"


def ensure_ray(config: RayConfig) -> None:
    """Connect to the configured cluster, or start a local Ray bound to 127.0.0.1.

    A local Ray keeps its dashboard and job API on loopback, so nothing listens on an
    external interface. With RAY_ADDRESS set (as `ray job submit` does), ray.init joins that
    cluster instead.
    """
    if ray.is_initialized():
        return
    address = config.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    ray.init(
        num_cpus=config.num_cpus,
        dashboard_host=LOOPBACK,
        _node_ip_address=LOOPBACK,
    )


@dataclass
class TrainingOutcome:
    """Checkpoints and metric history of one finished TorchTrainer run."""

    best_checkpoint: ray.train.Checkpoint
    latest_checkpoint: ray.train.Checkpoint
    history: list[dict[str, Any]]
    best_metrics: dict[str, Any]


def standard_job(config: Config, task: Task) -> TrainingJob:
    """The demo's two jobs: supervised teacher training, and distillation into the student."""
    if task == "teacher":
        return TrainingJob(label="teacher", model_kind="teacher", optim=config.teacher_train)
    if task == "student":
        return TrainingJob(label="student", model_kind="student", distill=True, optim=config.student_train)
    raise ValueError(f"task must be 'teacher' or 'student', got {task!r}")


def run_name(config: Config, job: TrainingJob) -> str:
    return f"{config.run.name}-{job.label}"


def build_trainer(
    config: Config,
    job: TrainingJob | Task,
    rows: list[dict],
    teacher_checkpoint: ray.train.Checkpoint | None = None,
    loop: Callable[[dict], None] = train_loop_per_worker,
) -> TorchTrainer:
    """TorchTrainer for `job`; `loop` replaces the worker function (tests wrap it to inject faults)."""
    if isinstance(job, str):
        job = standard_job(config, job)
    if job.distill and teacher_checkpoint is None:
        raise ValueError(
            "distillation needs a trained teacher: set distill.teacher_checkpoint to a teacher "
            "checkpoint folder or s3:// URI, or run the demo, which trains one first"
        )
    storage_path, filesystem = resolve_storage(
        config.storage_path, config.run.storage_endpoint_url, storage_retry_policy(config.run)
    )
    scaling = config.scaling
    loop_config = {
        "config": config.model_dump(mode="json"),
        "job": job.model_dump(mode="json"),
        "rows": rows,
        "teacher_checkpoint": teacher_checkpoint,
    }
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker},
        ),
        run_config=RunConfig(
            # Relaunching with the same name and storage path resumes from its latest checkpoint.
            name=run_name(config, job),
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=config.run.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=config.run.checkpoints_to_keep,
                checkpoint_score_attribute="val_dice",
                checkpoint_score_order="max",
            ),
        ),
    )


def fit(
    config: Config,
    job: TrainingJob | Task,
    rows: list[dict],
    teacher_checkpoint: ray.train.Checkpoint | None = None,
    loop: Callable[[dict], None] = train_loop_per_worker,
) -> TrainingOutcome:
    """Run (or resume) training and return its best and latest checkpoints."""
    ensure_ray(config.ray)
    if isinstance(job, str):
        job = standard_job(config, job)
    trainer = build_trainer(config, job, rows, teacher_checkpoint, loop)
    return outcome_from_result(trainer.fit(), job.label)


def outcome_from_result(result: ray.train.Result, label: str) -> TrainingOutcome:
    if result.checkpoint is None:
        raise RuntimeError(
            f"{label} training finished without reporting a checkpoint; check the worker logs "
            "above for the first error"
        )
    best_checkpoint, best_metrics = max(
        result.best_checkpoints, key=lambda pair: pair[1].get("val_dice", float("-inf"))
    )
    with result.checkpoint.as_directory() as folder:
        history = read_meta(folder).get("history", [])
    return TrainingOutcome(
        best_checkpoint=best_checkpoint,
        latest_checkpoint=result.checkpoint,
        history=history,
        best_metrics=dict(best_metrics),
    )
