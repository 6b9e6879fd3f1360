"""A pyarrow filesystem that retries transient object-storage errors and uploads whole objects.

RetryingHandler wraps another pyarrow filesystem (in practice an S3FileSystem) as a
pyarrow.fs.PyFileSystem. Every call is retried with bounded exponential backoff when it fails
with a transient error: a timeout, an HTTP 5xx, throttling or a dropped connection. Errors a retry
cannot fix (missing object or bucket, access denied) are raised at once, unchanged.

Writes go to a local spooled buffer and are uploaded whole when the stream is closed. pyarrow's S3
output stream completes a multipart upload when it is destroyed, even after a failed part (its
destructor calls Close, in arrow/filesystem/s3fs.cc), so an upload that fails halfway can leave a
truncated object. This handler uploads only complete
buffers, checks the stored size, retries, and after the last failed attempt deletes a truncated
object that a failed attempt left at the path.

Ray Train 2.60 (ray/train/v2/_internal/execution/storage.py and checkpoint_manager.py) uses the
storage filesystem for create_dir, open_output_stream (the storage marker and the checkpoint
manager snapshot), get_file_info, open_input_stream, delete_dir and pyarrow.fs.copy_files, which uploads and
downloads checkpoint folders through open_output_stream and open_input_stream. The handler keeps
no credentials and pickles with the wrapped filesystem. An S3FileSystem built without explicit
keys pickles without them, and each process reads them from the AWS chain.
"""

import logging
import os
import random
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_RETRIES = 4
DEFAULT_RETRY_DELAY = 0.5  # seconds before the first retry
MAX_RETRY_DELAY = 30.0  # seconds; the cap of the doubling delay
SPOOL_MEMORY_BYTES = 16 * 2**20  # larger uploads spill to a temporary file
UPLOAD_CHUNK_BYTES = 8 * 2**20

# Errors that a retry cannot fix. OSError subclasses first, then AWS error names as pyarrow
# (26.0) writes them in messages: "AWS Error NO_SUCH_BUCKET during CreateMultipartUpload ...".
PERMANENT_OS_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
PERMANENT_AWS_ERRORS = frozenset({
    "ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "INVALID_SIGNATURE",
    "INVALID_CLIENT_TOKEN_ID", "UNRECOGNIZED_CLIENT", "MISSING_AUTHENTICATION_TOKEN", "INCOMPLETE_SIGNATURE",
    "NO_SUCH_BUCKET", "NO_SUCH_KEY", "NO_SUCH_UPLOAD", "RESOURCE_NOT_FOUND", "BUCKET_ALREADY_EXISTS",
    "BUCKET_ALREADY_OWNED_BY_YOU", "INVALID_PARAMETER_VALUE", "INVALID_PARAMETER_COMBINATION",
    "INVALID_QUERY_PARAMETER", "MALFORMED_QUERY_STRING", "MISSING_PARAMETER", "MISSING_ACTION",
    "INVALID_ACTION", "OPT_IN_REQUIRED", "VALIDATION", "OBJECT_NOT_IN_ACTIVE_TIER",
})
AWS_ERROR_PATTERN = re.compile(r"AWS Error (\w+)(?: \(HTTP status (\d+)\))?")
RETRYABLE_4XX = {408, 429}  # request timeout, too many requests


class StorageRetryError(OSError):
    """A storage call that still failed with a transient error after its last attempt."""


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts and backoff of storage calls: retries after the first attempt, delays in seconds."""

    retries: int = DEFAULT_RETRIES
    base_delay: float = DEFAULT_RETRY_DELAY
    max_delay: float = MAX_RETRY_DELAY

    def __post_init__(self) -> None:
        if self.retries < 0 or self.base_delay < 0 or self.max_delay < self.base_delay:
            raise ValueError(
                f"invalid retry policy {self}: retries and base_delay must be >= 0 and max_delay >= base_delay"
            )

    @property
    def attempts(self) -> int:
        return self.retries + 1

    def delay(self, failures: int) -> float:
        """Return the pause after `failures` failed attempts: doubling, capped, with jitter.

        The jitter (a factor from 0.5 to 1) keeps workers that failed together from retrying
        in lockstep against a throttling server.
        """
        return min(self.max_delay, self.base_delay * 2 ** (failures - 1)) * random.uniform(0.5, 1.0)


def is_transient(error: BaseException) -> bool:
    """Return True for an OSError that a later attempt may not repeat (network, 5xx, throttling)."""
    if not isinstance(error, OSError) or isinstance(error, PERMANENT_OS_ERRORS):
        return False
    match = AWS_ERROR_PATTERN.search(str(error))
    if match is None:
        return True
    name, status = match.group(1), match.group(2)
    if name in PERMANENT_AWS_ERRORS:
        return False
    if status is not None and 400 <= int(status) < 500:
        return int(status) in RETRYABLE_4XX
    return True


def call_with_retries(
    policy: RetryPolicy, action: str, call: Callable[[], T], done: Callable[[], bool] | None = None
) -> T:
    """Run `call`, retrying transient errors; `action` names the operation and path for messages.

    `done` is for calls that are not idempotent (delete, move). An attempt that failed
    transiently may still have succeeded on the server, and then a retry fails with a permanent
    error. In that case the call counts as successful if done() returns True.
    """
    started = time.monotonic()
    for attempt in range(1, policy.attempts + 1):
        try:
            return call()
        except OSError as error:
            if not is_transient(error):
                if attempt > 1 and done is not None and done():
                    return None  # type: ignore[return-value]
                raise
            if attempt == policy.attempts:
                raise StorageRetryError(
                    f"{action} failed after {attempt} attempts in {time.monotonic() - started:.1f} s; last error: "
                    f"{error}. Check the storage endpoint and the network, or raise run.storage_retries"
                ) from error
            pause = policy.delay(attempt)
            logger.warning(
                "%s failed (attempt %d of %d), retrying in %.2f s: %s", action, attempt, policy.attempts, pause, error
            )
            time.sleep(pause)
    raise AssertionError("unreachable: the loop returns or raises")


class ForwardingHandler(pafs.FileSystemHandler):
    """A FileSystemHandler that passes every call to the pyarrow filesystem `inner`."""

    def __init__(self, inner: pafs.FileSystem):
        self.inner = inner

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.inner.equals(other.inner)  # type: ignore[attr-defined]

    def __ne__(self, other: object) -> bool:
        return not self == other

    def get_type_name(self) -> str:
        return f"forwarding_{self.inner.type_name}"

    def normalize_path(self, path: str) -> str:
        return self.inner.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self.inner.get_file_info(paths)

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self.inner.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self.inner.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self.inner.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.inner.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        self.inner.delete_dir_contents("", accept_root_dir=True)

    def delete_file(self, path: str) -> None:
        self.inner.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self.inner.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self.inner.copy_file(src, dest)

    # compression=None: the outer PyFileSystem has already applied the compression detected
    # from the file name, so the inner filesystem must pass bytes through unchanged.
    def open_input_stream(self, path: str) -> pa.NativeFile:
        return self.inner.open_input_stream(path, compression=None)

    def open_input_file(self, path: str) -> pa.NativeFile:
        return self.inner.open_input_file(path)

    def open_output_stream(self, path: str, metadata: Any) -> pa.NativeFile:
        return self.inner.open_output_stream(path, compression=None, metadata=metadata)

    def open_append_stream(self, path: str, metadata: Any) -> pa.NativeFile:
        return self.inner.open_append_stream(path, compression=None, metadata=metadata)


class RetryingHandler(ForwardingHandler):
    """Retries transient errors of `inner` under `policy`, and uploads each written object whole."""

    def __init__(
        self, inner: pafs.FileSystem, policy: RetryPolicy = RetryPolicy(), spool_memory: int = SPOOL_MEMORY_BYTES
    ):
        super().__init__(inner)
        self.policy = policy
        self.spool_memory = spool_memory

    def __eq__(self, other: object) -> bool:
        return super().__eq__(other) and self.policy == other.policy  # type: ignore[attr-defined]

    def get_type_name(self) -> str:
        return f"retrying_{self.inner.type_name}"

    def retry(self, action: str, call: Callable[[], T], done: Callable[[], bool] | None = None) -> T:
        return call_with_retries(self.policy, action, call, done)

    def _exists(self, path: str) -> bool:
        return self.inner.get_file_info(path).type != pafs.FileType.NotFound

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self.retry(f"getting information on {paths!r}", lambda: self.inner.get_file_info(paths))

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self.retry(f"listing {selector.base_dir!r}", lambda: self.inner.get_file_info(selector))

    def create_dir(self, path: str, recursive: bool) -> None:
        self.retry(f"creating directory {path!r}", lambda: self.inner.create_dir(path, recursive=recursive))

    def delete_dir(self, path: str) -> None:
        self.retry(
            f"deleting directory {path!r}", lambda: self.inner.delete_dir(path), done=lambda: not self._exists(path)
        )

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.retry(
            f"deleting the contents of {path!r}",
            lambda: self.inner.delete_dir_contents(path, missing_dir_ok=missing_dir_ok),
        )

    def delete_root_dir_contents(self) -> None:
        self.retry("deleting every object", lambda: self.inner.delete_dir_contents("", accept_root_dir=True))

    def delete_file(self, path: str) -> None:
        self.retry(f"deleting {path!r}", lambda: self.inner.delete_file(path), done=lambda: not self._exists(path))

    def move(self, src: str, dest: str) -> None:
        # On S3 a move is a copy then a delete, so a failed attempt may have done both halves.
        self.retry(
            f"moving {src!r} to {dest!r}", lambda: self.inner.move(src, dest),
            done=lambda: not self._exists(src) and self._exists(dest),
        )

    def copy_file(self, src: str, dest: str) -> None:
        self.retry(f"copying {src!r} to {dest!r}", lambda: self.inner.copy_file(src, dest))

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return pa.PythonFile(RetryingReader(self, path), mode="r")

    def open_input_file(self, path: str) -> pa.NativeFile:
        return pa.PythonFile(RetryingReader(self, path), mode="r")

    def open_output_stream(self, path: str, metadata: Any) -> pa.NativeFile:
        return pa.PythonFile(SpooledUpload(self, path, metadata), mode="w")

    def open_append_stream(self, path: str, metadata: Any) -> pa.NativeFile:
        raise NotImplementedError(
            f"appending to {path!r} is not supported: object stores have no append; write the whole object"
        )

    def upload(self, path: str, spool: Any, metadata: Any) -> None:
        """Upload the spooled bytes to `path` whole, retrying transient errors.

        After the last failed attempt, an object at `path` that changed during the upload and
        has the wrong size is deleted, because only a failed attempt can have left it. An older
        version of the object that no attempt replaced stays.
        """
        size = spool.seek(0, os.SEEK_END)
        before = self.retry(f"getting information on {path!r}", lambda: self.inner.get_file_info(path))
        try:
            self.retry(f"uploading {path!r} ({size} bytes)", lambda: self._upload_once(path, spool, size, metadata))
        except OSError:
            self._remove_truncated(path, size, before)
            raise

    def _upload_once(self, path: str, spool: Any, size: int, metadata: Any) -> None:
        spool.seek(0)
        stream = self.inner.open_output_stream(path, compression=None, metadata=metadata)
        try:
            while chunk := spool.read(UPLOAD_CHUNK_BYTES):
                stream.write(chunk)
            stream.close()
        except OSError:
            # pyarrow cannot abort a stream from Python, and a destroyed S3 stream completes its
            # upload. Destroy the failed one now, so it cannot complete after a later attempt.
            del stream
            raise
        stored = self.inner.get_file_info(path)
        if stored.size != size:
            raise OSError(f"upload of {path!r} stored {stored.size} bytes of {size}")

    def _remove_truncated(self, path: str, size: int, before: pafs.FileInfo) -> None:
        try:
            stored = self.inner.get_file_info(path)
            unchanged = (stored.type, stored.size, stored.mtime) == (before.type, before.size, before.mtime)
            if stored.type == pafs.FileType.File and stored.size != size and not unchanged:
                self.inner.delete_file(path)
                logger.warning("deleted %r: a failed upload left %d bytes of %d", path, stored.size, size)
        except OSError as error:
            logger.error(
                "could not check %r for a truncated upload (%s); delete it if its size is not %d bytes", path, error, size
            )


class SpooledUpload:
    """Write side of an object: bytes collect in a local spool and are uploaded on close()."""

    mode = "wb"

    def __init__(self, handler: RetryingHandler, path: str, metadata: Any):
        self._handler = handler
        self._path = path
        self._metadata = metadata
        self._spool = tempfile.SpooledTemporaryFile(max_size=handler.spool_memory, prefix="cervi_ray_upload_")
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        return self._spool.write(data)

    def tell(self) -> int:
        return self._spool.tell()

    def flush(self) -> None:
        """Do nothing: the object is sent whole on close()."""

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._handler.upload(self._path, self._spool, self._metadata)
        finally:
            self._spool.close()


class RetryingReader:
    """Read side of an object: positioned reads of the inner file, reopened and retried on transient errors."""

    mode = "rb"

    def __init__(self, handler: RetryingHandler, path: str):
        self._handler = handler
        self._path = path
        self._position = 0
        self._size = 0
        self._closed = False
        self._file: pa.NativeFile | None = handler.retry(f"opening {path!r}", self._open)

    def _open(self) -> pa.NativeFile:
        file = self._handler.inner.open_input_file(self._path)
        self._size = file.size()
        return file

    def _read_at(self, nbytes: int, offset: int) -> bytes:
        if self._file is None:
            self._file = self._open()
        try:
            return self._file.read_at(nbytes, offset)
        except OSError:
            self._file = None  # the connection may be broken; the next attempt opens the object again
            raise

    @property
    def closed(self) -> bool:
        return self._closed

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, nbytes: int = -1) -> bytes:
        offset = self._position
        if nbytes is None or nbytes < 0:
            nbytes = max(0, self._size - offset)
        data = self._handler.retry(f"reading {self._path!r} at byte {offset}", lambda: self._read_at(nbytes, offset))
        self._position += len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        origins = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self._size}
        if whence not in origins:
            raise ValueError(f"invalid whence {whence} for {self._path!r}; use 0, 1 or 2")
        self._position = max(0, origins[whence] + offset)
        return self._position

    def tell(self) -> int:
        return self._position

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._closed = True


def retrying_filesystem(inner: pafs.FileSystem, policy: RetryPolicy = RetryPolicy()) -> pafs.PyFileSystem:
    """Wrap `inner` so its transient errors are retried under `policy` and its uploads are whole."""
    return pafs.PyFileSystem(RetryingHandler(inner, policy))
