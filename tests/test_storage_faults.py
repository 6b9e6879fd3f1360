"""Transient object-storage errors and the retrying filesystem that hides them.

Faults come from tests/faults.py's handler around the real S3FileSystem of a moto server on
127.0.0.1. Ray Train checkpoints through the same faults are tested on a multi-node cluster, as a
distillation job (tests/test_multinode.py).
"""

import pickle

import boto3
import pytest

from cervi_ray.retrying_fs import RetryPolicy, StorageRetryError, is_transient, retrying_filesystem
from cervi_ray.storage import resolve_storage, s3_filesystem
from faults import faulty_filesystem, injected, open_uploads, stored_keys

FAST_RETRIES = RetryPolicy(retries=3, base_delay=0.01)
BUCKET = "faults"


@pytest.fixture
def bucket(s3_server):
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket=BUCKET)
    return client


@pytest.fixture
def prefix(tmp_path) -> str:
    """A key prefix of this test's own: moto keeps one store per process, shared by its servers."""
    return tmp_path.name


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
    assert stored_keys(bucket, BUCKET, prefix) == {}
    assert open_uploads(bucket, BUCKET, prefix) == []


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
