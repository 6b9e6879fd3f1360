"""Local paths and s3:// URIs for checkpoints and results.

Credentials are never passed around here: pyarrow's S3 filesystem reads them from the standard
AWS chain (environment, config files, instance or pod roles) and refreshes expiring ones.
"""

from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

S3_SCHEME = "s3://"


def is_remote(uri: str) -> bool:
    return uri.startswith(S3_SCHEME)


def s3_filesystem(endpoint_url: str | None = None, region: str | None = None) -> pafs.S3FileSystem:
    """Create an S3 filesystem, optionally for an S3-compatible server such as MinIO."""
    options: dict = {}
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


def resolve_storage(uri: str, endpoint_url: str | None = None) -> tuple[str, pafs.FileSystem | None]:
    """Split a storage URI into (path, filesystem) for Ray's RunConfig and Checkpoint.

    A local path comes back absolute with no filesystem, and Ray then uses the local one.
    An s3:// URI comes back as "bucket/prefix" with an S3 filesystem object, so credentials
    stay inside pyarrow.
    """
    if is_remote(uri):
        path = uri[len(S3_SCHEME):].strip("/")
        if not path:
            raise ValueError(f"storage URI {uri!r} names no bucket; use s3://bucket/prefix")
        return path, s3_filesystem(endpoint_url)
    if "://" in uri:
        raise ValueError(f"storage URI {uri!r}: only local paths and s3:// are supported")
    return str(Path(uri).expanduser().resolve()), None
