"""The Ray Train worker function: a `Session` over ray.train around the shared engine."""

import logging
import os
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from torch import nn

from cervi_ray.config import Config
from cervi_ray.train.engine import TrainingJob, run_training

logger = logging.getLogger(__name__)

MLFLOW_RUN_ID_ENV = "MLFLOW_RUN_ID"  # read by mlflow.start_run


def start_run_with_ray(
    tracking_uri: str, experiment_id: str, run_name: str, tags: dict[str, str], resume_run_id: str | None
) -> str:
    """Start the MLflow run through Ray's setup_mlflow (a cervi_ray.tracking.RunStarter).

    setup_mlflow (Ray 2.60) works in Train V2 workers, in Tune trials and in plain processes. It
    makes the run mlflow's active run of this thread. The engine tracks on rank 0 only, so
    rank_zero_only is off. The tracker logs the config in one batch, where setup_mlflow would
    send one request per parameter.
    """
    from ray.air.integrations.mlflow import setup_mlflow

    # mlflow.start_run reopens the run named in MLFLOW_RUN_ID and then removes the variable. It
    # carries the run to reopen here, and a value the user set is put back afterwards.
    user_run_id = os.environ.pop(MLFLOW_RUN_ID_ENV, None)
    if resume_run_id is not None:
        os.environ[MLFLOW_RUN_ID_ENV] = resume_run_id
    try:
        mlflow = setup_mlflow(
            tracking_uri=tracking_uri, experiment_id=experiment_id, run_name=run_name, tags=tags,
            rank_zero_only=False,
        )
    finally:
        os.environ.pop(MLFLOW_RUN_ID_ENV, None)
        if user_run_id is not None:
            os.environ[MLFLOW_RUN_ID_ENV] = user_run_id
    return mlflow.active_run().info.run_id


class RayTrainSession:
    """Rank, device, restore and report of one Ray Train worker."""

    mlflow_starter = staticmethod(start_run_with_ray)

    def __init__(self) -> None:
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()

    def restored_checkpoint(self):
        checkpoint = ray.train.get_checkpoint()
        return None if checkpoint is None else checkpoint.as_directory()

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        # Every rank calls report (it is a barrier); only rank 0 passes a checkpoint.
        checkpoint = None if checkpoint_dir is None else ray.train.Checkpoint.from_directory(str(checkpoint_dir))
        ray.train.report(metrics, checkpoint=checkpoint)

    def wrap_model(self, model: nn.Module) -> nn.Module:
        return ray.train.torch.prepare_model(model, move_to_device=False)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Run one TrainingJob on this worker.

    loop_config: {"config": resolved Config as dict, "job": TrainingJob as dict,
    "rows": manifest rows with their split, "teacher_checkpoint": ray.train.Checkpoint or None}.
    """
    # Ray logs each report with its whole metrics dict at INFO; the engine's epoch line is shorter.
    logging.getLogger("ray.train.v2._internal.execution.context").setLevel(logging.WARNING)
    config = Config.model_validate(loop_config["config"])
    job = TrainingJob.model_validate(loop_config["job"])
    torch.set_num_threads(config.scaling.cpus_per_worker)
    session = RayTrainSession()

    teacher = loop_config.get("teacher_checkpoint")
    if teacher is None:
        run_training(config, job, loop_config["rows"], session)
        return
    with teacher.as_directory() as teacher_dir:
        run_training(config, job, loop_config["rows"], session, teacher_dir=Path(teacher_dir))
