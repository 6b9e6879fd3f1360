"""Transient object-storage errors: the retrying filesystem alone, and Ray Train checkpoints to S3.

Faults come from a FileSystemHandler around the real S3FileSystem of a moto server on 127.0.0.1.
It counts attempts per path in a file, so the Ray driver and workers share one count.
"""

import fcntl
import json
import pickle
from collections import defaultdict
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from cervi_ray.checkpoint import load_model, load_training_state, read_meta
from cervi_ray.pipeline import prepare_data
from cervi_ray.retrying_fs import ForwardingHandler, RetryPolicy, StorageRetryError, is_transient, retrying_filesystem
from cervi_ray.storage import resolve_storage, s3_filesystem
from cervi_ray.train import trainer as trainer_module
from cervi_ray.train.trainer import fit

FAST_RETRIES = RetryPolicy(retries=3, base_delay=0.01)
BUCKET = "faults"


def faulty_filesystem(
    inner: pafs.FileSystem, record: Path, write_failures=2, open_failures=1, read_failures=0, truncate_first=True
):
    """Wrap `inner` so the first attempts on every path fail; attempts are logged to `record`.

    With `truncate_first`, write attempt 1 stores half of the object and then drops the
    connection, as a multipart upload completed by a destroyed pyarrow stream would. Other
    failed writes and opens raise before anything is stored, with the messages pyarrow gives for
    throttling and HTTP 503. A failed read drops the connection after the object was opened.
    The handler class is local to this function, so Ray pickles it by value: workers cannot
    import test modules.
    """

    class HalfWriter:
        """Stores the first half of the written bytes at `path`, then fails like a reset connection."""

        mode = "wb"

        def __init__(self, path: str):
            self.path, self.data, self.closed = path, bytearray(), False

        def write(self, data) -> int:
            self.data += bytes(data)
            return len(data)

        def flush(self) -> None:
            pass

        def close(self) -> None:
            if self.closed:
                return
            self.closed = True
            stored_bytes = len(self.data) // 2
            with inner.open_output_stream(self.path, compression=None) as stream:
                stream.write(bytes(self.data[:stored_bytes]))
            raise ConnectionResetError(
                f"injected: connection reset after {stored_bytes} of {len(self.data)} bytes of {self.path}"
            )

    class DroppingReader:
        """Read side whose first read fails, as a connection reset in the middle of a GET would."""

        mode = "rb"

        def __init__(self, file: pa.NativeFile):
            self.file, self.closed, self.failed = file, False, False

        def read(self, nbytes=-1) -> bytes:
            if not self.failed:
                self.failed = True
                raise OSError("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 56, injected reset")
            return self.file.read(nbytes)

        def seek(self, offset, whence=0) -> int:
            return self.file.seek(offset, whence)

        def tell(self) -> int:
            return self.file.tell()

        def close(self) -> None:
            self.closed = True
            self.file.close()

    class FaultyHandler(ForwardingHandler):
        def get_type_name(self) -> str:
            return "faulty"

        def _attempt(self, kind: str, path: str) -> int:
            """Log an attempt of `kind` on `path` and return its number, counted over all processes."""
            with open(record, "a+") as log:
                fcntl.flock(log, fcntl.LOCK_EX)
                log.seek(0)
                number = sum(1 for line in log if line == f"{kind} {path}\n") + 1
                log.write(f"{kind} {path}\n")
            return number

        def _fail(self, kind: str, path: str) -> None:
            with open(record, "a") as log:
                fcntl.flock(log, fcntl.LOCK_EX)
                log.write(f"failed {kind} {path}\n")

        def open_output_stream(self, path, metadata):
            attempt = self._attempt("write", path)
            if attempt <= write_failures:
                self._fail("write", path)
                if attempt == 1 and truncate_first:
                    return pa.PythonFile(HalfWriter(path), mode="w")
                raise OSError(f"When uploading '{path}': AWS Error SLOW_DOWN during PutObject operation: injected")
            return super().open_output_stream(path, metadata)

        def open_input_file(self, path):
            attempt = self._attempt("open", path)
            if attempt <= open_failures:
                self._fail("open", path)
                raise OSError(f"When reading '{path}': AWS Error UNKNOWN (HTTP status 503) during HeadObject operation")
            file = super().open_input_file(path)
            if attempt <= open_failures + read_failures:
                self._fail("read", path)
                return pa.PythonFile(DroppingReader(file), mode="r")
            return file

    return pafs.PyFileSystem(FaultyHandler(inner))


def injected(record: Path) -> dict[str, list[str]]:
    """Return the paths of each kind of injected failure ("write", "open", "read") in `record`."""
    failures: dict[str, list[str]] = defaultdict(list)
    if record.exists():
        for line in record.read_text().splitlines():
            if line.startswith("failed "):
                _, kind, path = line.split(" ", 2)
                failures[kind].append(path)
    return failures


@pytest.fixture
def bucket(s3_server):
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket=BUCKET)
    return client


@pytest.fixture
def prefix(tmp_path) -> str:
    """A key prefix of this test's own: moto keeps one store per process, shared by its servers."""
    return tmp_path.name


def stored_keys(client, prefix: str) -> dict[str, int]:
    """Return {key: size} of the objects under `prefix`, without pyarrow's folder markers ("a/b/")."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    objects = (item for page in pages for item in page.get("Contents", []))
    return {item["Key"]: item["Size"] for item in objects if not item["Key"].endswith("/")}


def open_uploads(client, prefix: str) -> list[str]:
    return [upload["Key"] for upload in client.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads", [])]


def test_transient_errors_classified():
    cases = {
        "AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 7": True,
        "AWS Error SLOW_DOWN during PutObject operation": True,
        "AWS Error UNKNOWN (HTTP status 503) during GetObject operation": True,
        "AWS Error UNKNOWN (HTTP status 429) during PutObject operation": True,
        "AWS Error REQUEST_TIMEOUT during UploadPart operation": True,
        "AWS Error NO_SUCH_BUCKET during PutObject operation": False,
        "AWS Error ACCESS_DENIED during PutObject operation": False,
        "AWS Error UNKNOWN (HTTP status 403) during HeadObject operation": False,
    }
    for message, transient in cases.items():
        assert is_transient(OSError(message)) is transient, message
    assert is_transient(ConnectionResetError("reset by peer"))
    assert is_transient(TimeoutError("timed out"))
    assert not is_transient(FileNotFoundError("Path does not exist 'bucket/key'"))
    assert not is_transient(PermissionError("denied"))
    assert not is_transient(ValueError("not an I/O error"))


def test_write_retried_then_complete(bucket, prefix, s3_server, tmp_path):
    record = tmp_path / "attempts.log"
    filesystem = retrying_filesystem(faulty_filesystem(s3_filesystem(s3_server), record), FAST_RETRIES)
    payload = bytes(range(256)) * 4096  # 1 MiB

    with filesystem.open_output_stream(f"{BUCKET}/{prefix}/model.bin") as stream:
        stream.write(payload[:1000])
        stream.write(payload[1000:])

    assert injected(record)["write"] == [f"{BUCKET}/{prefix}/model.bin"] * 2
    stored = bucket.get_object(Bucket=BUCKET, Key=f"{prefix}/model.bin")["Body"].read()
    assert len(stored) == len(payload)
    assert stored == payload


def test_write_gives_up_naming_path(bucket, prefix, s3_server, tmp_path):
    record = tmp_path / "attempts.log"
    policy = RetryPolicy(retries=2, base_delay=0.01)
    filesystem = retrying_filesystem(faulty_filesystem(s3_filesystem(s3_server), record, write_failures=10), policy)

    with pytest.raises(StorageRetryError) as raised:
        with filesystem.open_output_stream(f"{BUCKET}/{prefix}/meta.json") as stream:
            stream.write(b'{"epoch": 1}' * 100)

    message = str(raised.value)
    assert f"'{BUCKET}/{prefix}/meta.json'" in message
    assert "after 3 attempts" in message
    assert "run.storage_retries" in message
    assert len(injected(record)["write"]) == 3
    # The first attempt stored half an object; giving up removed it, and no upload is left open.
    assert stored_keys(bucket, prefix) == {}
    assert open_uploads(bucket, prefix) == []


def test_failed_overwrite_keeps_old_version(bucket, prefix, s3_server, tmp_path):
    record = tmp_path / "attempts.log"
    bucket.put_object(Bucket=BUCKET, Key=f"{prefix}/snapshot.json", Body=b'{"version": 1}')
    inner = faulty_filesystem(s3_filesystem(s3_server), record, write_failures=10, truncate_first=False)
    filesystem = retrying_filesystem(inner, RetryPolicy(retries=1, base_delay=0.01))

    with pytest.raises(StorageRetryError, match="after 2 attempts"):
        with filesystem.open_output_stream(f"{BUCKET}/{prefix}/snapshot.json") as stream:
            stream.write(b'{"version": 2, "longer": true}')

    assert bucket.get_object(Bucket=BUCKET, Key=f"{prefix}/snapshot.json")["Body"].read() == b'{"version": 1}'


def test_permanent_error_not_retried(bucket, prefix, s3_server, tmp_path):
    record = tmp_path / "attempts.log"
    filesystem = retrying_filesystem(faulty_filesystem(s3_filesystem(s3_server), record, open_failures=0), FAST_RETRIES)

    with pytest.raises(FileNotFoundError):
        filesystem.open_input_stream(f"{BUCKET}/{prefix}/no-such-key")
    assert record.read_text().splitlines() == [f"open {BUCKET}/{prefix}/no-such-key"]

    with pytest.raises(OSError, match="NO_SUCH_BUCKET"):
        without_faults = retrying_filesystem(s3_filesystem(s3_server), FAST_RETRIES)
        with without_faults.open_output_stream("no-such-bucket/key") as stream:
            stream.write(b"x")


def test_reads_retried(bucket, prefix, s3_server, tmp_path):
    record = tmp_path / "attempts.log"
    payload = bytes(range(256)) * 64
    bucket.put_object(Bucket=BUCKET, Key=f"{prefix}/blob.bin", Body=payload)
    filesystem = retrying_filesystem(faulty_filesystem(s3_filesystem(s3_server), record, read_failures=1), FAST_RETRIES)
    path = f"{BUCKET}/{prefix}/blob.bin"

    with filesystem.open_input_stream(path) as stream:
        assert stream.read() == payload
    with filesystem.open_input_file(path) as file:
        assert file.size() == len(payload)
        assert file.read_at(100, 5000) == payload[5000:5100]

    failures = injected(record)
    assert failures["open"] == [path]
    assert failures["read"] == [path]


def test_filesystem_pickles_without_keys(s3_server, fake_aws_env):
    _, filesystem = resolve_storage(f"s3://{BUCKET}/prefix", s3_server, FAST_RETRIES)
    data = pickle.dumps(filesystem)

    restored = pickle.loads(data)
    assert restored.equals(filesystem)
    assert restored.handler.policy == FAST_RETRIES
    assert fake_aws_env["AWS_SECRET_ACCESS_KEY"].encode() not in data
    assert fake_aws_env["AWS_ACCESS_KEY_ID"].encode() not in data


def checkpoint_folders(keys: dict[str, int], run_prefix: str) -> dict[str, set[str]]:
    """Group the object keys under `run_prefix` by checkpoint folder."""
    folders: dict[str, set[str]] = defaultdict(set)
    for key in keys:
        folder, _, name = key[len(run_prefix):].partition("/")
        if folder.startswith("checkpoint_") and name:
            folders[folder].add(name)
    return folders


@pytest.mark.ray
def test_checkpoints_survive_upload_faults(ray_cluster, baby_config, bucket, s3_server, tmp_path, monkeypatch):
    record = tmp_path / "attempts.log"
    real_resolve = trainer_module.resolve_storage

    def resolve_with_faults(uri, endpoint_url=None, retry=None):
        # The driver resolves storage once; Ray pickles the filesystem to the controller and workers.
        path, _ = real_resolve(uri, endpoint_url, retry)
        return path, retrying_filesystem(faulty_filesystem(s3_filesystem(endpoint_url), record), retry)

    monkeypatch.setattr(trainer_module, "resolve_storage", resolve_with_faults)
    tree = baby_config.model_dump(mode="json")
    tree["teacher_train"].update(epochs=3, val_every=1)
    tree["scaling"].update(num_workers=1)
    tree["tracking"].update(enabled=False)
    tree["run"].update(
        name="faulty", storage_path=f"s3://{BUCKET}/ray", storage_endpoint_url=s3_server,
        storage_retries=3, storage_retry_delay=0.01, checkpoints_to_keep=2,
    )
    config = type(baby_config).model_validate(tree)

    outcome = fit(config, "teacher", prepare_data(config).to_dict(orient="records"))

    assert [entry["epoch"] for entry in outcome.history] == [1, 2, 3]
    failures = injected(record)
    checkpoint_writes = [path for path in failures["write"] if "/checkpoint_" in path]
    assert any(path.endswith("/model.safetensors") for path in checkpoint_writes)
    assert any(path.endswith("/meta.json") for path in checkpoint_writes)
    assert failures["open"], "the driver's download of the latest checkpoint met no injected failure"

    run_prefix = "ray/faulty-teacher/"
    keys = stored_keys(bucket, run_prefix)
    folders = checkpoint_folders(keys, run_prefix)
    snapshot_object = bucket.get_object(Bucket=BUCKET, Key=f"{run_prefix}checkpoint_manager_snapshot.json")
    snapshot = json.loads(snapshot_object["Body"].read())
    registered = {result["checkpoint_dir_name"] for result in snapshot["checkpoint_results"]}
    # Every checkpoint folder in the bucket is one Ray kept, and Ray kept checkpoints_to_keep.
    assert set(folders) == registered
    assert len(folders) == 2
    epochs = []
    for folder, names in folders.items():
        assert names == {"meta.json", "model.safetensors", "training_state.pt"}, folder
        local = tmp_path / "download" / folder
        local.mkdir(parents=True)
        for name in names:
            bucket.download_file(BUCKET, f"{run_prefix}{folder}/{name}", str(local / name))
        model, meta = load_model(local)
        assert meta["model_kind"] == "teacher"
        assert load_training_state(local) is not None
        epochs.append(read_meta(local)["epoch"])
    assert 3 in epochs
    # Nothing else is stored: no half-written objects beside the checkpoints, no open uploads.
    others = {key for key in keys if key[len(run_prefix):].partition("/")[0] not in folders}
    assert others == {f"{run_prefix}checkpoint_manager_snapshot.json", f"{run_prefix}.validate_storage_marker"}
    assert open_uploads(bucket, run_prefix) == []
