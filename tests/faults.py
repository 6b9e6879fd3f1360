"""Fault injection and the checks after a fault, for the storage tests and the multi-node tests.

Storage faults come from a FileSystemHandler around a real S3FileSystem. It counts attempts per
path in a file, so a Ray driver and its workers on any node of this machine share one count.
Classes that Ray sends to workers are defined inside functions, so Ray pickles them by value,
because workers do not have the tests folder on their import path.
"""

import fcntl
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs

from cervi_ray.checkpoint import (
    ADAPTER_FILE, META_FILE, MODEL_FILE, TRAINING_STATE_FILE, load_model, load_training_state, read_meta,
)
from cervi_ray.retrying_fs import ForwardingHandler, RetryPolicy, retrying_filesystem
from cervi_ray.scoring.slides import SlideStorage
from cervi_ray.scoring.stages import HEADER_INDEX, StageSettings, plan_slide
from cervi_ray.storage import s3_filesystem

CHECKPOINT_FILES = {META_FILE, MODEL_FILE, TRAINING_STATE_FILE}
# A distilled student's checkpoint also stores the feature adapter that maps it to the teacher.
DISTILLATION_FILES = {ADAPTER_FILE}

# Storage faults.


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


def faulty_storage_resolver(real_resolve, record: Path):
    """Wrap a resolve_storage function so the filesystem it returns injects faults into S3 requests.

    The driver resolves storage once, and Ray pickles the filesystem to the controller and the
    training workers, so every checkpoint upload and download passes the faults.
    """

    def resolve_with_faults(uri: str, endpoint_url: str | None = None, retry: RetryPolicy | None = None):
        path, _ = real_resolve(uri, endpoint_url, retry)
        return path, retrying_filesystem(faulty_filesystem(s3_filesystem(endpoint_url), record), retry)

    return resolve_with_faults


def stored_keys(client, bucket: str, prefix: str) -> dict[str, int]:
    """Return {key: size} of the objects under `prefix`, without pyarrow's folder markers ("a/b/")."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    objects = (item for page in pages for item in page.get("Contents", []))
    return {item["Key"]: item["Size"] for item in objects if not item["Key"].endswith("/")}


def open_uploads(client, bucket: str, prefix: str) -> list[str]:
    return [upload["Key"] for upload in client.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])]


def checkpoint_folders(keys: dict[str, int], run_prefix: str) -> dict[str, set[str]]:
    """Group the object keys under `run_prefix` by checkpoint folder."""
    folders: dict[str, set[str]] = defaultdict(set)
    for key in keys:
        folder, _, name = key[len(run_prefix):].partition("/")
        if folder.startswith("checkpoint_") and name:
            folders[folder].add(name)
    return folders


def check_checkpoint_bucket(
    client, bucket: str, run_prefix: str, download_dir: Path, model_kind: str, files: set[str] = CHECKPOINT_FILES,
) -> list[int]:
    """Check a run's checkpoints in S3 after storage faults and return their epochs, sorted.

    Every checkpoint folder under `run_prefix` must be one that Ray registered in its snapshot,
    with exactly `files`, loadable. Nothing else may be stored beside them (no half-written
    objects), and no multipart upload may be left open.
    """
    keys = stored_keys(client, bucket, run_prefix)
    folders = checkpoint_folders(keys, run_prefix)
    snapshot_object = client.get_object(Bucket=bucket, Key=f"{run_prefix}checkpoint_manager_snapshot.json")
    snapshot = json.loads(snapshot_object["Body"].read())
    registered = {result["checkpoint_dir_name"] for result in snapshot["checkpoint_results"]}
    assert set(folders) == registered, f"checkpoint folders {sorted(folders)} but Ray registered {sorted(registered)}"

    epochs = []
    for folder, names in folders.items():
        assert names == files, f"{folder} contains {sorted(names)}, expected {sorted(files)}"
        local = download_dir / folder
        local.mkdir(parents=True)
        for name in names:
            client.download_file(bucket, f"{run_prefix}{folder}/{name}", str(local / name))
        _, meta = load_model(local)
        assert meta["model_kind"] == model_kind
        assert load_training_state(local) is not None
        epochs.append(read_meta(local)["epoch"])

    others = {key for key in keys if key[len(run_prefix):].partition("/")[0] not in folders}
    assert others == {f"{run_prefix}checkpoint_manager_snapshot.json", f"{run_prefix}.validate_storage_marker"}
    assert open_uploads(client, bucket, run_prefix) == []
    return sorted(epochs)


# Scoring outputs.


def expected_tiles(scoring, slides: Path, model_mpp: float, has_cytoplasm: bool = True) -> dict[str, set[tuple[int, int]]]:
    """Plan each slide of the folder as the scoring chain does and return its kept tiles' level-0 (x, y)."""
    settings = StageSettings(
        tile_size=scoring.tile_size, overlap=scoring.overlap, min_tissue_fraction=scoring.min_tissue_fraction,
        model_mpp=model_mpp, slide_mpp=scoring.slide_mpp, thumbnail_size=scoring.thumbnail_size, storage=SlideStorage(),
        views=len(scoring.tta), has_cytoplasm=has_cytoplasm, write_masks=False,
    )
    expected = {}
    for path in sorted(slides.iterdir()):
        rows = plan_slide({"slide_id": path.stem, "uri": str(path)}, settings)
        assert json.loads(rows[0]["slide_info"])["status"] == "ok", rows[0]["slide_info"]
        expected[path.stem] = {(row["x"], row["y"]) for row in rows if row["tile_index"] != HEADER_INDEX}
    return expected


def check_each_tile_once(output: Path, expected: dict[str, set[tuple[int, int]]]) -> dict[str, Any]:
    """Check that every slide is ok and every planned tile appears once; return the outputs' counts."""
    tiles = pd.read_parquet(output / "tiles")
    summaries = pd.read_parquet(output / "slides")
    assert sorted(summaries["slide_id"]) == sorted(expected)
    assert (summaries["status"] == "ok").all(), summaries[["slide_id", "status", "error"]]
    assert (tiles["status"] == "ok").all()
    for slide_id, cells in expected.items():
        rows = tiles[tiles["slide_id"] == slide_id]
        coordinates = list(zip(rows["x"], rows["y"]))
        assert len(coordinates) == len(set(coordinates)), f"{slide_id}: duplicate tiles"
        assert set(coordinates) == cells, f"{slide_id}: tiles missing or unexpected"
        assert summaries.set_index("slide_id").loc[slide_id, "tiles_scored"] == len(cells)
    return {"slides": len(summaries), "tiles": len(tiles)}
