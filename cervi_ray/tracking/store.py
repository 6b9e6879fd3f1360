"""MLflow stores, run names, tags and parameters: the helpers under every RunTracker."""

import functools
import hashlib
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cervi_ray.checkpoint import code_version
from cervi_ray.config import Config

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)

SQLITE_PREFIX = "sqlite:///"  # then the database path: sqlite:////data/mlflow.db is /data/mlflow.db
STORE_FOLDER = "mlruns"  # under run.output_dir: mlflow.db and artifacts/
TENSORBOARD_FOLDER = "tensorboard"  # under run.output_dir: one folder per run name
# Parameters whose key contains one of these words are never logged.
SECRET_WORDS = ("key", "secret", "token", "password")
# MLflow 3.x limit on a parameter value (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH).
MAX_PARAM_LENGTH = 6000
RUN_KEY_TAG = "cervi_ray.run_key"  # SHA-256 of "<storage path>/<run name>", to reopen a resumed run
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own tag for nested runs
MAX_ERROR_LENGTH = 500  # characters of a backend error kept in the log line
# user:password@ (or token@) in a URI such as https://user:password@host/ or s3://key:secret@bucket.
_URI_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


class RunStarter(Protocol):
    """Start an MLflow run, or reopen `resume_run_id`, and return the run id."""

    def __call__(
        self, tracking_uri: str, experiment_id: str, run_name: str, tags: dict[str, str], resume_run_id: str | None
    ) -> str: ...


# Stores, names and tags.


def tracking_uri(config: Config) -> str:
    """tracking.mlflow_tracking_uri, else the SQLite store under run.output_dir."""
    if config.tracking.mlflow_tracking_uri is not None:
        return config.tracking.mlflow_tracking_uri
    return f"{SQLITE_PREFIX}{default_store(config) / 'mlflow.db'}"


def default_store(config: Config) -> Path:
    return Path(config.run.output_dir).resolve() / STORE_FOLDER


def artifact_location(config: Config) -> str | None:
    """Artifact root of a new experiment: artifacts/ beside a SQLite file, else None (the server decides).

    MLflow's own default for a SQLite store is ./mlartifacts under the working directory.
    """
    uri = tracking_uri(config)
    if not uri.startswith(SQLITE_PREFIX):
        return None
    # A relative database path is relative to the working directory, as SQLite reads it.
    return (Path(uri.removeprefix(SQLITE_PREFIX)).resolve().parent / "artifacts").as_uri()


@functools.lru_cache(maxsize=8)
def mlflow_client(uri: str) -> "MlflowClient":
    """Return this process's client for `uri`; every new client checks the store's schema again (seconds)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def redact(text: str) -> str:
    """Replace the credentials of every URI in `text` (scheme://user:password@) with ***."""
    return _URI_CREDENTIALS.sub(r"\g<scheme>***@", text)


def file_sha256(path: str | Path) -> str | None:
    """Return the SHA-256 of a file, or None when it does not exist on this node."""
    path = Path(path)
    if not path.is_file():
        return None
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def git_commit(version: str) -> str:
    """Return the commit in a code_version() string such as "0.1.0+gabc1234", else "unknown"."""
    _, separator, local = version.partition("+g")
    return local if separator and local else "unknown"


def describe_model(config: Config, model_kind: str) -> str:
    """Describe a model kind with the settings that set its size, e.g. "teacher encoder=resnet18"."""
    model = config.model
    if model_kind == "teacher":
        return f"teacher encoder={model.teacher.encoder}"
    if model_kind == "student":
        student = model.student
        return f"student embed_dim={student.embed_dim} depths={student.depths}"
    return f"{model_kind} encoder={model.baselines.encoder}"


def run_tags(config: Config, task: str, model: str | None = None, with_data: bool = True) -> dict[str, str]:
    """Return the tags of a run: task, code version, git commit and, with_data, the sources and splits file hash."""
    version = code_version()
    tags = {"task": task, "code_version": version, "git_commit": git_commit(version)}
    if with_data:
        tags["dataset"] = ",".join(source.name for source in config.data.sources)
        # NOTE: the hash is of the splits file on this node. A worker on a node without the file
        # (a multi-node cluster without shared storage) records "missing".
        tags["split_file_sha256"] = file_sha256(config.splits_file) or "missing"
    if model is not None:
        tags["model"] = model
    return tags


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings and lists of mappings into dotted keys: {"data.sources.0.name": ...}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, list) and value and all(isinstance(item, Mapping) for item in value):
            flat.update(flatten({str(index): item for index, item in enumerate(value)}, f"{name}."))
        else:
            flat[name] = value
    return flat


def is_secret_key(key: str) -> bool:
    lowered = key.lower()
    return any(word in lowered for word in SECRET_WORDS)


def loggable_params(tree: Mapping[str, Any]) -> dict[str, str]:
    """Flatten `tree` into string parameters, leaving out secret-looking keys and URI credentials."""
    params = {}
    for key, value in flatten(tree).items():
        if is_secret_key(key):
            continue
        params[key] = redact(str(value))[:MAX_PARAM_LENGTH]
    return params


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Return the numeric entries of a report as floats (booleans as 0 or 1), except the epoch (the step)."""
    values = {}
    for key, value in metrics.items():
        if key == "epoch" or not isinstance(value, (bool, int, float)):
            continue
        values[key] = float(value)
    return values


def folder_name(run_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", run_name).strip("_") or "run"


def ensure_experiment(client: "MlflowClient", config: Config) -> str:
    """Return the id of tracking.experiment_name, creating the experiment when it does not exist."""
    from mlflow.exceptions import MlflowException

    name = config.tracking.experiment_name
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location(config))
        except MlflowException:
            # Another process (a parallel Tune trial) created it after the lookup.
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise ValueError(
            f"MLflow experiment {name!r} is deleted; restore it with `mlflow experiments restore` "
            "or set tracking.experiment_name to another name"
        )
    return experiment.experiment_id


def start_run_with_client(
    tracking_uri: str, experiment_id: str, run_name: str, tags: dict[str, str], resume_run_id: str | None
) -> str:
    """Start or reopen a run with MlflowClient calls only; the RunStarter of plain processes."""
    client = mlflow_client(tracking_uri)
    if resume_run_id is not None:
        client.update_run(resume_run_id, status="RUNNING")
        return resume_run_id
    return client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
