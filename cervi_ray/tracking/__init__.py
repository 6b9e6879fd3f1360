"""Experiment tracking: MLflow runs and TensorBoard scalars for training, sweeps, the demo and scoring.

A RunTracker records one run: tags that identify the data, code and model, the resolved config
as parameters, metrics per epoch (step = epoch) and files at the end. Tracking never stops the
work it records. The first error of a backend is logged once, with the error, and that backend
stays off for the rest of the run.

The default MLflow store is SQLite, because MLflow 3.18 raises on its file store (./mlruns)
unless MLFLOW_ALLOW_FILE_STORE=true. This package imports no Ray: inside Ray Train workers and
Ray Tune trials the session passes a RunStarter that goes through Ray's MLflow integration
(cervi_ray.train.loop.start_run_with_ray).
"""

from cervi_ray.tracking.runs import (
    log_pipeline_outputs, pipeline_tracker, scoring_metrics, scoring_tracker, summary_metrics,
    sweep_tracker, training_tracker,
)
from cervi_ray.tracking.store import (
    RunStarter, git_commit, loggable_params, redact, run_tags, start_run_with_client, tracking_uri,
)
from cervi_ray.tracking.tracker import RunTracker, TrackedSession

__all__ = [
    "RunStarter", "RunTracker", "TrackedSession", "git_commit", "log_pipeline_outputs", "loggable_params",
    "pipeline_tracker", "redact", "run_tags", "scoring_metrics", "scoring_tracker", "start_run_with_client",
    "summary_metrics", "sweep_tracker", "tracking_uri", "training_tracker",
]
