"""Ray Train on a local 127.0.0.1 cluster: 2 CPU workers, baby models, real data."""

from pathlib import Path

import boto3
import pytest

from cervi_ray.checkpoint import load_model, read_meta
from cervi_ray.pipeline import best_checkpoint_of_run, checkpoint_from_uri, prepare_data
from cervi_ray.train.trainer import fit
from overrides import with_overrides

pytestmark = pytest.mark.ray


def _rows(config):
    return prepare_data(config).to_dict(orient="records")


def test_teacher_loss_decreases_on_two_workers(ray_cluster, baby_config):
    config = with_overrides(
        baby_config, teacher_train__epochs=5, teacher_train__val_every=5, data__repeats=4,
        run__name="loss-drops",
    )
    outcome = fit(config, "teacher", _rows(config))

    losses = [entry["train_loss"] for entry in outcome.history]
    assert [entry["epoch"] for entry in outcome.history] == [1, 2, 3, 4, 5]
    assert losses[-1] < losses[0], f"training loss did not drop: {losses}"
    with outcome.best_checkpoint.as_directory() as folder:
        model, meta = load_model(folder)
    assert meta["model_kind"] == "teacher"
    assert meta["config"]["scaling"]["num_workers"] == 2


def test_relaunch_resumes_epoch_count(ray_cluster, baby_config):
    config = with_overrides(baby_config, teacher_train__epochs=2, run__name="resume")
    rows = _rows(config)
    first = fit(config, "teacher", rows)
    assert [entry["epoch"] for entry in first.history] == [1, 2]

    # Same run name and storage path, more epochs: continues at epoch 3 instead of starting over.
    longer = with_overrides(config, teacher_train__epochs=4)
    second = fit(longer, "teacher", rows)
    with second.latest_checkpoint.as_directory() as folder:
        meta = read_meta(folder)
    assert [entry["epoch"] for entry in second.history] == [1, 2, 3, 4]
    assert meta["epoch"] == 4
    assert meta["metrics"]["resumed_from_epoch"] == 2
    assert second.history[0]["train_loss"] == first.history[0]["train_loss"]

    # The prune command finds the same best checkpoint by reading the run's folders.
    found = best_checkpoint_of_run(longer, "teacher")
    assert Path(found.path) == Path(second.best_checkpoint.path)
    assert best_checkpoint_of_run(longer, "no-such-run") is None

    # Relaunching a finished run trains nothing more and returns the same checkpoints.
    third = fit(longer, "teacher", rows)
    assert [entry["epoch"] for entry in third.history] == [1, 2, 3, 4]
    assert third.latest_checkpoint.path == second.latest_checkpoint.path
    assert third.best_checkpoint.path == second.best_checkpoint.path


def test_checkpoints_in_s3(ray_cluster, baby_config, s3_server):
    bucket = "cervi-ray-test"
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket=bucket)
    config = with_overrides(
        baby_config, teacher_train__epochs=1, run__name="s3",
        run__storage_path=f"s3://{bucket}/ray", run__storage_endpoint_url=s3_server,
    )
    outcome = fit(config, "teacher", _rows(config))

    keys = [item["Key"] for item in client.list_objects_v2(Bucket=bucket, Prefix="ray/s3-teacher/")["Contents"]]
    assert any(key.endswith("/model.safetensors") for key in keys)
    assert any(key.endswith("/meta.json") for key in keys)

    # The same checkpoint, addressed by URI as a user would pass it to evaluate or distill.
    uri = f"s3://{outcome.best_checkpoint.path}"
    with checkpoint_from_uri(uri, s3_server).as_directory() as folder:
        model, meta = load_model(folder)
    assert meta["epoch"] == 1
