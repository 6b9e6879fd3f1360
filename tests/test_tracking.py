"""Experiment tracking: MLflow runs and TensorBoard scalars read back with their own readers."""

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cervi_ray.checkpoint import code_version
from cervi_ray.config import Config
from cervi_ray.pipeline import prepare_data
from cervi_ray.scoring.pipeline import ScoringReport
from cervi_ray.tracking import (
    RunTracker,
    git_commit,
    log_pipeline_outputs,
    loggable_params,
    pipeline_tracker,
    redact,
    scoring_metrics,
    scoring_tracker,
    tracking_uri,
)
from cervi_ray.train import engine as engine_module
from cervi_ray.train.engine import LocalSession, run_training
from cervi_ray.train.trainer import fit, standard_job
from overrides import with_overrides

ONE_SOURCE = [{"name": "isbi2015", "kind": "isbi2015", "path": "isbi2015/Training"}]
FAKE_PASSWORD = "hunter2"  # stands for a credential inside a URI; must never reach a log or a param


def _small(config: Config, **overrides) -> Config:
    """The baby profile on the 8 ISBI 2015 images at 128 x 128, so a CPU epoch takes seconds."""
    return with_overrides(config, data__sources=ONE_SOURCE, data__scale=0.125, **overrides)


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory) -> str:
    """One SQLite store for this module, so MLflow creates its tables once (seconds per store)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def store_config(baby_config, shared_store, request) -> Config:
    """The small profile tracking to the shared store, in an experiment of its own per test."""
    return _small(baby_config, tracking__mlflow_tracking_uri=shared_store, tracking__experiment_name=request.node.name)


def _runs(config: Config) -> list:
    client = MlflowClient(tracking_uri(config))
    experiment = client.get_experiment_by_name(config.tracking.experiment_name)
    assert experiment is not None, f"no MLflow experiment {config.tracking.experiment_name!r}"
    return client.search_runs([experiment.experiment_id])


def _tracking_files(config: Config) -> list[Path]:
    output = Path(config.run.output_dir)
    return [path for folder in ("mlruns", "tensorboard") for path in (output / folder).rglob("*")]


def _tracking_warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("cervi_ray.tracking") and r.levelno >= logging.WARNING]


def test_local_run_logs_params_tags_metrics(baby_config):
    config = _small(
        baby_config, teacher_train__epochs=2,
        run__storage_endpoint_url=f"http://keyid:{FAKE_PASSWORD}@127.0.0.1:9000",
    )
    rows = prepare_data(config).to_dict(orient="records")
    session = LocalSession(Path(config.run.output_dir) / "local")

    run_training(config, standard_job(config, "teacher"), rows, session)

    runs = _runs(config)
    assert [run.info.run_name for run in runs] == ["baby-teacher"]
    run = runs[0]
    assert run.info.status == "FINISHED"
    params, tags = run.data.params, run.data.tags
    assert params["teacher_train.epochs"] == "2"
    assert params["data.sources.0.name"] == "isbi2015"
    assert params["job.model_kind"] == "teacher"
    assert params["run.storage_endpoint_url"] == "http://***@127.0.0.1:9000"
    assert not [key for key, value in params.items() if FAKE_PASSWORD in value]
    assert tags["split_file_sha256"] == hashlib.sha256(config.splits_file.read_bytes()).hexdigest()
    assert tags["git_commit"] == git_commit(code_version())
    assert tags["dataset"] == "isbi2015"
    assert tags["model"] == "teacher encoder=mobilenet_v2"
    assert tags["task"] == "teacher"

    # One value per epoch, step = epoch, equal to what the session reported.
    client = MlflowClient(tracking_uri(config))
    reported = {name: [report[name] for report in session.reports] for name in ("train_loss", "val_dice")}
    for name, values in reported.items():
        history = sorted(client.get_metric_history(run.info.run_id, name), key=lambda metric: metric.step)
        assert [metric.step for metric in history] == [1, 2], name
        assert [metric.value for metric in history] == pytest.approx(values), name

    # TensorBoard: the same scalar names, steps and values (stored as float32).
    events = EventAccumulator(str(Path(config.run.output_dir) / "tensorboard" / "baby-teacher"))
    events.Reload()
    assert set(run.data.metrics) <= set(events.Tags()["scalars"])
    for name, values in reported.items():
        scalars = events.Scalars(name)
        assert [event.step for event in scalars] == [1, 2], name
        assert [event.value for event in scalars] == pytest.approx(values, rel=1e-6), name


def test_relaunch_reopens_same_run(store_config):
    config = with_overrides(store_config, teacher_train__epochs=1)
    rows = prepare_data(config).to_dict(orient="records")
    session = LocalSession(Path(config.run.output_dir) / "local")
    run_training(config, standard_job(config, "teacher"), rows, session)

    # Same run name and checkpoint folder, one more epoch: training and its MLflow run continue.
    longer = with_overrides(config, teacher_train__epochs=2)
    run_training(longer, standard_job(longer, "teacher"), rows, session)

    runs = _runs(config)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["teacher_train.epochs"] == "1"  # MLflow keeps the first value
    assert run.data.tags["resumed_with.teacher_train.epochs"] == "2"
    history = MlflowClient(tracking_uri(config)).get_metric_history(run.info.run_id, "train_loss")
    assert sorted(metric.step for metric in history) == [1, 2]
    events = EventAccumulator(str(Path(config.run.output_dir) / "tensorboard" / "baby-teacher"))
    events.Reload()
    assert [event.step for event in events.Scalars("train_loss")] == [1, 2]


def test_disabled_tracking_writes_no_files(baby_config, monkeypatch):
    config = _small(baby_config, tracking__enabled=False)

    def one_epoch(config, job, rows, session, teacher_dir):
        # A stand-in for the training loop: one report, as the engine sends after epoch 1.
        session.report({"epoch": 1, "train_loss": 0.5}, None)

    monkeypatch.setattr(engine_module, "_train", one_epoch)
    session = LocalSession(Path(config.run.output_dir) / "local")
    run_training(config, standard_job(config, "teacher"), [], session)

    assert session.reports == [{"epoch": 1, "train_loss": 0.5}]
    assert _tracking_files(config) == []
    with RunTracker(config, "unused", {}).start({"a": 1}) as tracker:
        tracker.log_metrics({"loss": 1.0}, step=1)
        tracker.log_text("text", "note.txt")
    assert _tracking_files(config) == []


def test_broken_uri_training_completes(baby_config, caplog):
    uri = f"nosuchscheme://user:{FAKE_PASSWORD}@tracking.invalid/"
    config = _small(baby_config, teacher_train__epochs=1, tracking__mlflow_tracking_uri=uri)
    rows = prepare_data(config).to_dict(orient="records")
    session = LocalSession(Path(config.run.output_dir) / "local")

    with caplog.at_level(logging.INFO, logger="cervi_ray"):
        run_training(config, standard_job(config, "teacher"), rows, session)

    assert [report["epoch"] for report in session.reports] == [1]
    assert len(session.checkpoints()) == 1
    warnings = _tracking_warnings(caplog)
    assert len(warnings) == 1, [record.getMessage() for record in warnings]
    message = warnings[0].getMessage()
    assert "baby-teacher" in message
    assert "MLflow tracking is off" in message
    assert FAKE_PASSWORD not in caplog.text
    # TensorBoard is a separate backend and keeps working.
    assert list((Path(config.run.output_dir) / "tensorboard" / "baby-teacher").glob("events.out.tfevents.*"))


def test_params_drop_secret_keys():
    params = loggable_params({
        "storage": {"aws_secret_access_key": "abc", "api_token": "abc", "Password": "abc", "endpoint": "s3://bucket"},
        "tracking": {"uri": f"https://alice:{FAKE_PASSWORD}@mlflow.example/"},
        "sources": [{"name": "a"}, {"name": "b"}],
    })
    assert params == {
        "storage.endpoint": "s3://bucket",
        "tracking.uri": "https://***@mlflow.example/",
        "sources.0.name": "a",
        "sources.1.name": "b",
    }
    assert redact(f"failed for postgresql://bob:{FAKE_PASSWORD}@db:5432/x") == "failed for postgresql://***@db:5432/x"


def test_pipeline_run_has_report_artifacts(store_config):
    config = store_config
    run_dir = config.run_dir
    (run_dir / "eval" / "teacher").mkdir(parents=True)
    (run_dir / "report.md").write_text("# report\n")
    (run_dir / "curves_teacher.png").write_bytes(b"png")
    (run_dir / "eval" / "teacher" / "metrics.json").write_text("{}")
    summary = {
        "training": {"teacher": {"best_val_dice": 0.5}},
        "results": {"teacher": {"isbi2015": {"pixel": {"nucleus": {"dice": 0.25}, "cell": {"dice": None}}}}},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))

    with pipeline_tracker(config) as tracker:
        log_pipeline_outputs(tracker, run_dir)

    client = MlflowClient(tracking_uri(config))
    run = client.get_run(tracker.run_id)
    assert run.info.run_name == "baby"
    assert run.data.metrics == {"teacher/best_val_dice": 0.5, "teacher/isbi2015/dice_nucleus": 0.25}
    names = {item.path for item in client.list_artifacts(tracker.run_id)}
    assert {"report.md", "curves_teacher.png", "summary.json", "eval"} <= names
    eval_files = [item.path for item in client.list_artifacts(tracker.run_id, "eval/teacher")]
    assert eval_files == ["eval/teacher/metrics.json"]


def test_scoring_run_records_counts(store_config):
    config = store_config
    report = ScoringReport("out", slides_listed=3, slides_already_done=1, statuses=Counter(ok=1, failed=1),
                           tiles_scored=40, seconds=8.0)

    with scoring_tracker(config) as tracker:
        tracker.log_metrics(scoring_metrics(report), step=0)

    run = MlflowClient(tracking_uri(config)).get_run(tracker.run_id)
    assert run.info.run_name == "baby-score"
    assert run.data.tags["task"] == "score"
    assert run.data.metrics["tiles_per_second"] == 5.0  # 40 tiles in 8 s
    assert run.data.metrics["slides_failed"] == 1.0
    assert run.data.metrics["slides_listed"] == 3.0


@pytest.mark.ray
def test_ray_train_tracks_rank_zero_only(ray_cluster, store_config):
    # Batches of 2, so each of the 2 workers gets a batch from the few training crops.
    config = with_overrides(
        store_config, teacher_train__epochs=1, teacher_train__batch_size_per_worker=2, run__name="tracked"
    )
    fit(config, "teacher", prepare_data(config).to_dict(orient="records"))

    runs = _runs(config)
    assert [run.info.run_name for run in runs] == ["tracked-teacher"]  # one run, not one per worker
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["scaling.num_workers"] == "2"
    assert list(run.data.metrics)
    assert "val_dice" in run.data.metrics
    history = MlflowClient(tracking_uri(config)).get_metric_history(run.info.run_id, "val_dice")
    assert [metric.step for metric in history] == [1]
    assert list((Path(config.run.output_dir) / "tensorboard" / "tracked-teacher").glob("events.out.tfevents.*"))
