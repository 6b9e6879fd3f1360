"""Self-describing model bundles: a checkpoint folder plus what a user needs to apply the model.

A bundle directory is a superset of a checkpoint folder, so cervi_ray.checkpoint.load_model
loads it unchanged:
  model.safetensors   network weights, copied byte for byte from the checkpoint
  meta.json           the checkpoint's meta.json plus a "bundle" entry: creation time, source
                      checkpoint, SHA-256 and size of every other file, the ONNX check results
  config.yaml         the resolved config the model was trained with
  labels.json         label values, class names and what each class covers
  preprocessing.json  input normalisation, channel order, grey-scale handling, training
                      resolution, padding and the TTA views of model_tta.onnx
  metrics.json        held-out metrics from `cervi-ray evaluate`, or a record that none were given
  MODEL_CARD.md       intended use, training data, metrics, limitations and how to load
  model.onnx          optional: logits (cervi_ray.export.onnx_export)
  model_tta.onnx      optional: TTA-averaged probabilities

Training state (optimizer and scheduler state, distillation adapter, pruning masks) stays out.
A bundle is built in a hidden staging folder next to the output and renamed into place at the
end, so a failed export leaves no partial bundle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cervi_ray.checkpoint import META_FILE, MODEL_FILE, code_version, load_model, read_meta
from cervi_ray.config import config_from_dict, save_config
from cervi_ray.export.model_card import render_model_card
from cervi_ray.export.records import labels_record, metrics_record, preprocessing_record, read_metrics
from cervi_ray.export.onnx_export import export_and_check, metadata_props, padding_multiple
from cervi_ray.models.complexity import count_parameters
from cervi_ray.storage import is_remote
from cervi_ray.tta import validate_transforms

logger = logging.getLogger(__name__)

BUNDLE_FORMAT_VERSION = 1
BUNDLE_KEY = "bundle"
CONFIG_FILE = "config.yaml"
LABELS_FILE = "labels.json"
PREPROCESSING_FILE = "preprocessing.json"
METRICS_FILE = "metrics.json"
MODEL_CARD_FILE = "MODEL_CARD.md"
METRICS_SPLITS = ("train", "val", "test")
REQUIRED_META_KEYS = ("model_kind", "num_classes", "label_map", "label_mode", "training_resolution", "config")

_HASH_CHUNK_BYTES = 1 << 20  # 1 MiB reads keep memory flat for large weight files


@dataclass
class BundleResult:
    """Paths and file records of a bundle written by build_bundle."""

    folder: Path
    archive: Path | None
    files: dict[str, dict[str, Any]]  # name -> {"sha256": hex, "bytes": size}, meta.json excluded
    onnx: dict[str, Any] | None  # the "onnx" record of meta["bundle"], None without ONNX


def build_bundle(
    checkpoint: str | Path,
    output: str | Path,
    *,
    metrics: str | Path | None = None,
    metrics_split: str = "test",
    onnx: bool = True,
    tta: Sequence[str] | None = None,
    tta_onnx: bool = True,
    onnx_size: int | None = None,
    archive: bool = False,
    force: bool = False,
    source: str | None = None,
) -> BundleResult:
    """Build a bundle directory at `output` from the local checkpoint folder `checkpoint`.

    Args:
        metrics: metrics.json written by `cervi-ray evaluate` (or the folder that contains it), with
            the held-out metrics of this checkpoint on `metrics_split`.
        onnx: write model.onnx, and model_tta.onnx unless `tta_onnx` is False. Both are checked
            against PyTorch on ONNX Runtime before the bundle is kept.
        tta: views of model_tta.onnx; default: eval.tta of the checkpoint's config.
        onnx_size: side of the square example input traced for ONNX; default model.input_size.
        archive: also write <output>.tar.gz next to the bundle folder.
        force: replace an existing non-empty `output` folder and archive.
        source: the checkpoint's URI to record in meta.json, when `checkpoint` is a local copy.

    Raises FileNotFoundError or ValueError for an invalid checkpoint or metrics file,
    FileExistsError when `output` (or the archive) exists and `force` is False, and
    OnnxMismatchError when ONNX Runtime does not reproduce PyTorch.
    """
    checkpoint = Path(checkpoint).expanduser()
    output = Path(output).expanduser().absolute()
    archive_path = output.with_name(output.name + ".tar.gz") if archive else None
    if metrics_split not in METRICS_SPLITS:
        raise ValueError(f"metrics_split must be one of {', '.join(METRICS_SPLITS)}, got {metrics_split!r}")

    # Check every input before any work, so that mistakes fail fast.
    meta = _read_checkpoint_meta(checkpoint)
    _check_output(checkpoint, output, archive_path, force)
    metrics_path: Path | None = None
    metrics_input = None
    if metrics is not None:
        metrics_path, metrics_input = read_metrics(Path(metrics).expanduser(), meta)
    config = config_from_dict(meta["config"], origin=f"config stored in {checkpoint / META_FILE}")
    tta_names = None
    if onnx and tta_onnx:
        tta_names = validate_transforms(config.eval.tta if tta is None else tta)
    model, _ = load_model(checkpoint)
    if onnx and onnx_size is not None and onnx_size < padding_multiple(model):
        raise ValueError(
            f"onnx_size (--onnx-size) must be at least {padding_multiple(model)}, the multiple this "
            f"model pads its input to, got {onnx_size}"
        )

    output.parent.mkdir(parents=True, exist_ok=True)
    with _staging_folder(output) as staging:
        # Weights, config and the JSON descriptions.
        shutil.copyfile(checkpoint / MODEL_FILE, staging / MODEL_FILE)
        save_config(config, staging / CONFIG_FILE)
        labels = labels_record(meta)
        _write_json(staging / LABELS_FILE, labels)
        preprocessing = preprocessing_record(meta, config, padding_multiple(model), tta_names)
        _write_json(staging / PREPROCESSING_FILE, preprocessing)
        metrics_entry = metrics_record(metrics_input, metrics_path, metrics_split, meta)
        _write_json(staging / METRICS_FILE, metrics_entry)

        # ONNX graphs, each checked against PyTorch before it is kept.
        onnx_record = None
        if onnx:
            onnx_record = export_and_check(
                model,
                staging,
                onnx_size or config.model.input_size,
                meta["num_classes"],
                config.model.in_channels,
                tta_names,
                metadata_props(meta, preprocessing),
            )

        # Model card, then the bundle entry of meta.json with the hashes of every other file.
        left_out = sorted(path.name for path in checkpoint.iterdir() if path.name not in (MODEL_FILE, META_FILE))
        bundle_meta = dict(meta)
        bundle_meta[BUNDLE_KEY] = {
            "format_version": BUNDLE_FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source_checkpoint": source or str(checkpoint.absolute()),
            "exported_by": code_version(),
            "left_out": left_out,  # training state and other files of the checkpoint
            "test_metrics_supplied": metrics_entry["test_metrics_supplied"],
            "onnx": onnx_record,
        }
        card = render_model_card(
            bundle_meta, labels, preprocessing, metrics_entry, count_parameters(model), onnx_record
        )
        (staging / MODEL_CARD_FILE).write_text(card)
        files = {path.name: _file_record(path) for path in sorted(staging.iterdir()) if path.name != META_FILE}
        bundle_meta[BUNDLE_KEY]["files"] = files
        _write_json(staging / META_FILE, bundle_meta)

        # Archive from the staging folder, then move both into place.
        staged_archive = _write_archive(staging, output) if archive_path is not None else None
        _install(staging, output)
        if staged_archive is not None and archive_path is not None:
            os.replace(staged_archive, archive_path)

    logger.info("wrote bundle %s with %d files", output, len(files) + 1)
    if archive_path is not None:
        logger.info("wrote archive %s", archive_path)
    return BundleResult(folder=output, archive=archive_path, files=files, onnx=onnx_record)


def build_bundle_from_uri(
    uri: str, output: str | Path, endpoint_url: str | None = None, **options: Any
) -> BundleResult:
    """Build a bundle from a checkpoint folder or s3:// URI, passing `options` to build_bundle.

    A remote checkpoint is first copied to a temporary local folder.
    """
    if not is_remote(uri):
        return build_bundle(uri, output, **options)

    from cervi_ray.pipeline import checkpoint_from_uri

    with checkpoint_from_uri(uri, endpoint_url).as_directory() as folder:
        return build_bundle(folder, output, source=uri, **options)


def verify_bundle(folder: str | Path) -> dict[str, Any]:
    """Check that every file listed in a bundle's meta.json exists with its SHA-256 and size.

    Returns the "bundle" entry of meta.json. Raises FileNotFoundError when meta.json is missing
    and ValueError, listing each missing or changed file, when the folder is not a bundle or
    does not match its record.
    """
    folder = Path(folder)
    meta = read_meta(folder)
    entry = meta.get(BUNDLE_KEY)
    if not isinstance(entry, dict) or not isinstance(entry.get("files"), dict):
        raise ValueError(
            f"{folder} is a checkpoint folder but not a bundle: {META_FILE} has no {BUNDLE_KEY!r} "
            "entry with a file list. Build one with `cervi-ray export`."
        )
    problems = []
    for name, expected in entry["files"].items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif _file_record(path) != expected:
            problems.append(f"{name} differs from its SHA-256 or size in {META_FILE}")
    if problems:
        raise ValueError(f"bundle {folder} does not match {META_FILE}: {'; '.join(problems)}. Export it again.")
    return entry


def _read_checkpoint_meta(checkpoint: Path) -> dict[str, Any]:
    if not checkpoint.exists():
        raise FileNotFoundError(f"checkpoint folder {checkpoint} not found")
    if not checkpoint.is_dir():
        raise ValueError(
            f"checkpoint {checkpoint} is a file. Pass the folder that contains {META_FILE} and {MODEL_FILE}."
        )
    meta = read_meta(checkpoint)
    missing = [key for key in REQUIRED_META_KEYS if key not in meta]
    if missing:
        raise ValueError(
            f"{checkpoint / META_FILE} lacks {', '.join(missing)}, so it was not written by "
            "cervi_ray.checkpoint.save_checkpoint with describe_model(...). Export a checkpoint "
            "written by training."
        )
    if not (checkpoint / MODEL_FILE).is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} has {META_FILE} but no {MODEL_FILE}")
    return meta


def _check_output(checkpoint: Path, output: Path, archive_path: Path | None, force: bool) -> None:
    source = checkpoint.resolve()
    target = output.resolve()
    if target == source or target in source.parents:
        raise ValueError(
            f"bundle folder {output} would contain the checkpoint {checkpoint}, which --force would "
            "delete. Choose an --output outside the checkpoint's folders."
        )
    if output.is_file():
        raise FileExistsError(f"bundle folder {output} is a file. Choose another --output.")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise FileExistsError(
            f"bundle folder {output} already exists and is not empty. Pass --force (force=True) "
            "to replace it, or choose another --output."
        )
    if archive_path is not None and archive_path.exists() and not force:
        raise FileExistsError(
            f"archive {archive_path} already exists. Pass --force (force=True) to replace it."
        )


@contextmanager
def _staging_folder(output: Path) -> Iterator[Path]:
    """Create a hidden staging folder next to `output` and remove it, and its archive, on exit.

    The folder is on the same file system as `output`, so renaming it into place is atomic.
    """
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    staging.chmod(0o755)  # mkdtemp makes the folder private (0o700), but bundles are shared
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        _staged_archive_path(staging).unlink(missing_ok=True)


def _install(staging: Path, output: Path) -> None:
    """Rename `staging` to `output`, replacing an existing folder there."""
    if not output.exists():
        staging.rename(output)
        return
    if not any(output.iterdir()):
        output.rmdir()
        staging.rename(output)
        return
    replaced = Path(tempfile.mkdtemp(prefix=f".{output.name}.replaced-", dir=output.parent))
    replaced.rmdir()
    output.rename(replaced)
    staging.rename(output)
    shutil.rmtree(replaced)


def _write_archive(staging: Path, output: Path) -> Path:
    """Write a .tar.gz of `staging`, with `output`'s name as the top folder, and return its path."""
    archive = _staged_archive_path(staging)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(staging, arcname=output.name)
    return archive


def _staged_archive_path(staging: Path) -> Path:
    return staging.with_name(staging.name + ".tar.gz")


def _file_record(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(_HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return {"sha256": digest.hexdigest(), "bytes": path.stat().st_size}


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, allow_nan=False) + "\n")
