"""A training `Session` for a Ray Tune trial: one process, checkpoints through ray.tune."""

from pathlib import Path
from typing import Any

import ray.train
import ray.tune
import torch
from torch import nn

from cervi_ray.train.loop import start_run_with_ray


class TuneSession:
    """Rank 0 of 1 inside a Tune trial; reports and checkpoints go to the trial's storage."""

    rank = 0
    world_size = 1
    mlflow_starter = staticmethod(start_run_with_ray)

    def __init__(self, use_gpu: bool = False) -> None:
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        # Trials of one sweep share run.name and job labels, so the trial id keeps their MLflow
        # runs and TensorBoard folders apart.
        self.tracking_suffix = ray.tune.get_context().get_trial_id()

    def restored_checkpoint(self):
        checkpoint = ray.tune.get_checkpoint()
        return None if checkpoint is None else checkpoint.as_directory()

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        checkpoint = None if checkpoint_dir is None else ray.train.Checkpoint.from_directory(str(checkpoint_dir))
        ray.tune.report(metrics, checkpoint=checkpoint)

    def wrap_model(self, model: nn.Module) -> nn.Module:
        return model
