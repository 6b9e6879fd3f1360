"""The Ray Train worker function: a `Session` over ray.train around the shared engine."""

import logging
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from torch import nn

from cervi_ray.config import Config
from cervi_ray.train.engine import TrainingJob, run_training

logger = logging.getLogger(__name__)


class RayTrainSession:
    """Rank, device, restore and report of one Ray Train worker."""

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
