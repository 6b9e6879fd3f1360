"""RunTracker: one MLflow run and one TensorBoard folder, and the Session wrapper that feeds it."""

import hashlib
import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from cervi_ray.config import Config
from cervi_ray.tracking.store import (
    MAX_ERROR_LENGTH, PARENT_RUN_TAG, RUN_KEY_TAG, TENSORBOARD_FOLDER, RunStarter,
    default_store, ensure_experiment, folder_name, loggable_params, mlflow_client, numeric_metrics,
    redact, start_run_with_client, tracking_uri,
)

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient
    from torch.utils.tensorboard import SummaryWriter

logger = logging.getLogger(__name__)

RunStatus = Literal["FINISHED", "FAILED", "KILLED"]


class RunTracker:
    """One MLflow run and one TensorBoard folder; every method is a no-op while tracking is off.

    Use as a context manager around the work: leaving it ends the MLflow run as FINISHED, or as
    FAILED (KILLED for Ctrl-C) when an exception passes through.
    """

    def __init__(
        self,
        config: Config,
        run_name: str,
        tags: Mapping[str, str],
        *,
        run_key: str | None = None,
        parent_run_id: str | None = None,
        starter: RunStarter | None = None,
        enabled: bool = True,
    ) -> None:
        settings = config.tracking
        self.config = config
        self.run_name = run_name
        self.run_id: str | None = None
        self.tensorboard_dir = Path(config.run.output_dir).resolve() / TENSORBOARD_FOLDER / folder_name(run_name)
        self._tags = dict(tags)
        if run_key is not None:
            self._tags[RUN_KEY_TAG] = hashlib.sha256(run_key.encode()).hexdigest()
        if parent_run_id is not None:
            self._tags[PARENT_RUN_TAG] = parent_run_id
        self._starter = starter or start_run_with_client
        self._mlflow_on = enabled and settings.enabled
        self._tensorboard_on = enabled and settings.enabled and settings.tensorboard
        self._client: MlflowClient | None = None
        self._writer: SummaryWriter | None = None

    @property
    def active(self) -> bool:
        """True while the MLflow run is open and healthy."""
        return self._mlflow_on and self.run_id is not None

    def start(self, params: Mapping[str, Any] | None = None, resume: bool = False) -> "RunTracker":
        """Open the MLflow run and log `params` (flattened). With resume, reopen this run key's latest run."""
        if not self._mlflow_on:
            return self
        try:
            self._start_mlflow(params or {}, resume)
        except Exception as error:  # any backend error: tracking must not stop the work it records
            self._disable_mlflow("starting the run", error)
        return self

    def _start_mlflow(self, params: Mapping[str, Any], resume: bool) -> None:
        from mlflow.entities import Param, RunTag

        uri = tracking_uri(self.config)
        if self.config.tracking.mlflow_tracking_uri is None:
            default_store(self.config).mkdir(parents=True, exist_ok=True)
        client = mlflow_client(uri)
        experiment_id = ensure_experiment(client, self.config)
        resume_run_id = self._latest_run(client, experiment_id) if resume else None
        self.run_id = self._starter(uri, experiment_id, self.run_name, self._tags, resume_run_id)
        self._client = client

        values = loggable_params(params)
        tags = dict(self._tags)
        if resume_run_id is not None:
            # MLflow rejects a new value for a logged parameter, so a relaunch that changed the
            # config (more epochs, say) records the new values as resumed_with.<key> tags.
            logged = client.get_run(resume_run_id).data.params
            changed = {key: value for key, value in values.items() if logged.get(key, value) != value}
            tags.update({f"resumed_with.{key}": value for key, value in changed.items()})
            values = {key: value for key, value in values.items() if key not in logged}
        client.log_batch(
            self.run_id,
            params=[Param(key, value) for key, value in values.items()],
            tags=[RunTag(key, value) for key, value in tags.items()],
        )
        logger.info(
            "MLflow run %s (%s%s) in experiment %r at %s", self.run_name, self.run_id,
            ", reopened" if resume_run_id else "", self.config.tracking.experiment_name, redact(uri),
        )

    def _latest_run(self, client: "MlflowClient", experiment_id: str) -> str | None:
        key = self._tags.get(RUN_KEY_TAG)
        if key is None:
            return None
        runs = client.search_runs(
            [experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'",
            order_by=["attributes.start_time DESC"], max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log the numeric entries of `metrics` at `step` to MLflow and TensorBoard, same names in both."""
        values = numeric_metrics(metrics)
        if not values:
            return
        if self.active:
            try:
                from mlflow.entities import Metric

                timestamp = int(time.time() * 1000)
                batch = [Metric(key, value, timestamp, step) for key, value in values.items()]
                self._client.log_batch(self.run_id, metrics=batch)
            except Exception as error:  # any backend error, as in start()
                self._disable_mlflow("logging metrics", error)
        if self._tensorboard_on:
            try:
                writer = self._tensorboard_writer(first_step=step)
                for key, value in values.items():
                    writer.add_scalar(key, value, step)
                writer.flush()
            except Exception as error:  # any backend error, as in start()
                self._disable_tensorboard(error)

    def _tensorboard_writer(self, first_step: int) -> "SummaryWriter":
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides the events at and after the first step from earlier writers to
            # this folder, so a resumed or repeated run shows one curve instead of overlapping ones.
            self._writer = SummaryWriter(str(self.tensorboard_dir), purge_step=first_step)
            logger.debug("TensorBoard events of %s in %s", self.run_name, self.tensorboard_dir)
        return self._writer

    def log_artifacts(self, paths: Iterable[Path], artifact_path: str | None = None) -> None:
        """Upload the files (or folders) in `paths` that exist; missing ones are skipped."""
        if not self.active:
            return
        try:
            for path in paths:
                path = Path(path)
                if path.is_dir():
                    self._client.log_artifacts(self.run_id, str(path), artifact_path)
                elif path.is_file():
                    self._client.log_artifact(self.run_id, str(path), artifact_path)
                else:
                    logger.debug("no %s to log for run %s", path, self.run_name)
        except Exception as error:  # any backend error, as in start()
            self._disable_mlflow("uploading artifacts", error)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Store `text` as the artifact `artifact_file` (e.g. "cv.md")."""
        if not self.active:
            return
        try:
            self._client.log_text(self.run_id, text, artifact_file)
        except Exception as error:  # any backend error, as in start()
            self._disable_mlflow("uploading artifacts", error)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Add or overwrite tags of the open run."""
        if not self.active:
            return
        try:
            from mlflow.entities import RunTag

            self._client.log_batch(self.run_id, tags=[RunTag(key, value) for key, value in tags.items()])
        except Exception as error:  # any backend error, as in start()
            self._disable_mlflow("setting tags", error)

    def finish(self, status: RunStatus = "FINISHED") -> None:
        """Close the TensorBoard writer and end the MLflow run with `status`; later calls do nothing."""
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception as error:  # any backend error, as in start()
                self._disable_tensorboard(error)
            self._writer = None
        self._tensorboard_on = False
        if self.active:
            try:
                self._end_run(status)
            except Exception as error:  # any backend error, as in start()
                self._disable_mlflow("ending the run", error)
        self._mlflow_on = False

    def _end_run(self, status: RunStatus) -> None:
        import mlflow

        # A run started through Ray's setup_mlflow is mlflow's active run in this thread. Ending it
        # with mlflow.end_run clears that state, so a later run in the same process starts clean.
        active = mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            mlflow.end_run(status)
        else:
            self._client.set_terminated(self.run_id, status)

    def _disable_mlflow(self, action: str, error: Exception) -> None:
        self._mlflow_on = False
        message = redact(f"{type(error).__name__}: {error}")[:MAX_ERROR_LENGTH]
        logger.warning(
            "MLflow tracking of run %s failed while %s: %s. MLflow tracking is off for the rest of "
            "this run, which goes on. Check tracking.mlflow_tracking_uri (now %s), or set "
            "tracking.enabled=false.",
            self.run_name, action, message, redact(tracking_uri(self.config)),
        )
        if self.run_id is not None and self._client is not None:
            try:
                self._client.set_terminated(self.run_id, "FAILED")
            except Exception:  # the store already failed, and the warning above reports it
                logger.debug("could not mark MLflow run %s failed", self.run_id)

    def _disable_tensorboard(self, error: Exception) -> None:
        self._tensorboard_on = False
        logger.warning(
            "TensorBoard logging of run %s to %s failed: %s. TensorBoard logging is off for the rest "
            "of this run, which goes on; set tracking.tensorboard=false to skip it.",
            self.run_name, self.tensorboard_dir, redact(f"{type(error).__name__}: {error}")[:MAX_ERROR_LENGTH],
        )

    def __enter__(self) -> "RunTracker":
        return self

    def __exit__(
        self, error_type: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> Literal[False]:
        if error_type is None:
            self.finish("FINISHED")
        else:
            self.finish("KILLED" if issubclass(error_type, KeyboardInterrupt) else "FAILED")
        return False


class TrackedSession:
    """A training Session that also sends each report's metrics to a RunTracker (step = epoch)."""

    def __init__(self, session: Any, tracker: RunTracker) -> None:
        self._session = session
        self._tracker = tracker

    def __getattr__(self, name: str) -> Any:
        # rank, world_size, device, restored_checkpoint and wrap_model come from the wrapped session.
        return getattr(self._session, name)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        self._tracker.log_metrics(metrics, step=int(metrics["epoch"]))
        self._session.report(metrics, checkpoint_dir)
