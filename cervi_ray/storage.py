"""Local paths and s3:// URIs for checkpoints and results.

Credentials are never passed around here: pyarrow's S3 filesystem reads them from the standard
AWS chain (environment, config files, instance or pod roles) and refreshes expiring ones.
An s3:// location comes back wrapped by cervi_ray.retrying_fs, which retries transient errors
and uploads each object whole.
"""

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import pyarrow.fs as pafs

from cervi_ray.retrying_fs import RetryPolicy, retrying_filesystem

if TYPE_CHECKING:
    from cervi_ray.config import RunConfig

S3_SCHEME = "s3://"


def is_remote(uri: str) -> bool:
    return uri.startswith(S3_SCHEME)


def s3_filesystem(endpoint_url: str | None = None, region: str | None = None) -> pafs.S3FileSystem:
    """Create an S3 filesystem, optionally for an S3-compatible server such as MinIO.

    With allow_delayed_open, pyarrow 26 sends an object under 10 MiB in one PUT request, so a
    failed upload of it leaves nothing behind. Without background_writes, each upload runs in its
    calling thread. Ray Train 2.60 turns threads off in pyarrow.fs.copy_files for S3 destinations
    because of a pyarrow threading problem (ray/train/v2/_internal/execution/storage.py), but it
    does not recognise the retrying wrapper, so copy_files uploads from its I/O thread pool here.
    """
    options: dict = {"allow_delayed_open": True, "background_writes": False}
    if endpoint_url:
        parsed = urlparse(endpoint_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(
                f"storage endpoint {endpoint_url!r} must look like http://host:port or https://host"
            )
        options.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
    if region:
        options["region"] = region
    return pafs.S3FileSystem(**options)


def storage_retry_policy(run: "RunConfig") -> RetryPolicy:
    """Return the retry policy of run.storage_retries and run.storage_retry_delay."""
    return RetryPolicy(retries=run.storage_retries, base_delay=run.storage_retry_delay)


def resolve_storage(
    uri: str, endpoint_url: str | None = None, retry: RetryPolicy | None = None
) -> tuple[str, pafs.FileSystem | None]:
    """Split a storage URI into (path, filesystem) for Ray's RunConfig and Checkpoint.

    A local path comes back absolute with no filesystem, and Ray then uses the local one.
    An s3:// URI comes back as "bucket/prefix" with an S3 filesystem wrapped to retry transient
    errors under `retry` (default: RetryPolicy()), so credentials stay inside pyarrow.
    """
    if is_remote(uri):
        path = uri[len(S3_SCHEME):].strip("/")
        if not path:
            raise ValueError(f"storage URI {uri!r} names no bucket; use s3://bucket/prefix")
        return path, retrying_filesystem(s3_filesystem(endpoint_url), retry or RetryPolicy())
    if "://" in uri:
        raise ValueError(f"storage URI {uri!r}: only local paths and s3:// are supported")
    return str(Path(uri).expanduser().resolve()), None
