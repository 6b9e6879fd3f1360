"""The bad-input corpus (tests/bad_inputs.py) driven through the product the way users drive it.

Every bad input must end in an error that names the file, key or value and states what to do or,
when scoring an archive, in a failed slide that records its error while the other slides
complete. Results written earlier must survive byte for byte. The last tests check the
guarantees of docs/security.md: pickled code never runs, credentials never reach a file or a
log, a local Ray serves its dashboard on 127.0.0.1, and scoring writes only under its output.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import boto3
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from PIL import Image

from bad_inputs import (
    IMAGE_SIZE,
    folder_config_text,
    good_mask,
    write_bad_configs,
    write_bad_slides,
    write_bad_splits,
    write_broken_images,
    write_float_tiffs,
    write_folder_source,
    write_good_slides,
    write_mask_mismatch,
    write_pickle_payload,
    write_scoring_manifest,
)
from cervi_ray.checkpoint import (
    META_FILE,
    MODEL_FILE,
    TRAINING_STATE_FILE,
    UnsafeCheckpointError,
    describe_model,
    save_checkpoint,
)
from cervi_ray.cli import main
from cervi_ray.config import save_config
from cervi_ray.data.dataset import SegmentationDataset
from cervi_ray.data.manifest import list_source
from cervi_ray.models import build_model
from cervi_ray.scoring.outputs import OutputStore, slide_summary, tile_table
from cervi_ray.scoring.stages import STAGE_SCHEMA
from cervi_ray.train.engine import LocalSession, TrainingJob, run_training

REPOSITORY = Path(__file__).resolve().parents[1]
BABY = REPOSITORY / "configs" / "baby.yaml"

# Broken image -> (where the folder reader fails, the fix the message gives). Files
# whose header is intact pass listing (`cervi-ray manifest`) and fail when the pixels load.
UNREADABLE = "Replace it with a complete image file or remove it from the data folder"
BROKEN_IMAGES = {
    "truncated.png": ("load", UNREADABLE),
    "truncated.tif": ("load", UNREADABLE),
    "truncated.bmp": ("load", UNREADABLE),
    "corrupted.png": ("load", UNREADABLE),
    "corrupted.bmp": ("load", UNREADABLE),
    "corrupted.tif": ("list", UNREADABLE),
    "empty.png": ("list", UNREADABLE),
    "empty.tif": ("list", UNREADABLE),
    "empty.bmp": ("list", UNREADABLE),
    "notes.png": ("list", UNREADABLE),
    "archive.tif": ("list", UNREADABLE),
    "bomb.png": ("list", "raise PIL.Image.MAX_IMAGE_PIXELS before loading it, or tile the image"),
}
LISTING_FAILURES = sorted(name for name, (stage, _) in BROKEN_IMAGES.items() if stage == "list")

# Bad config -> substrings of the error: the key or value at fault, and what to do.
FIX_KEYS = "Add, correct or remove these keys in"
BAD_CONFIGS = {
    "empty.yaml": ("data: Field required", FIX_KEYS),
    "missing_data.yaml": ("data: Field required", FIX_KEYS),
    "source_without_kind.yaml": ("data.sources.0.kind: Field required", FIX_KEYS),
    "wrong_type.yaml": ("teacher_train.epochs: Input should be a valid integer", "'many'", FIX_KEYS),
    "list_for_number.yaml": ("scaling.num_workers: Input should be a valid integer", "[2]", FIX_KEYS),
    "unknown_key.yaml": ("teacher_train.epoch: Extra inputs are not permitted", FIX_KEYS),
    "unknown_section.yaml": ("trainer: Extra inputs are not permitted", FIX_KEYS),
    "not_a_mapping.yaml": ("must contain a mapping of sections, got list",),
    "python_tag.yaml": ("is not valid YAML", "python/object/apply"),
}

# Bad splits file -> the reason the error gives.
BAD_SPLITS = {
    "zero_bytes.json": "invalid JSON",
    "invalid_json.json": "invalid JSON",
    "a_list.json": "expected a JSON object, got list",
    "missing_keys.json": "missing keys ['seed', 'test_fraction', 'folds_count', 'folds']",
    "test_not_a_list.json": "'test' must be a list of id strings",
}


def file_digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under `folder`, by path relative to it."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def updated(config, **sections):
    """A copy of `config` with the given keys of each section replaced (one level deep)."""
    tree = config.model_dump(mode="json")
    for section, values in sections.items():
        for key, value in values.items():
            if isinstance(value, dict):
                tree[section][key].update(value)
            else:
                tree[section][key] = value
    return type(config).model_validate(tree)


def load_folder_source(root: Path) -> SegmentationDataset:
    """List a folder source, then load every sample: `cervi-ray manifest`, then a training worker."""
    rows = list_source("folder", root, source="mine")
    return SegmentationDataset(rows, crop_size=32)


def source_with_bad_file(tmp_path: Path, name: str, role: str) -> Path:
    """A folder source whose image (role "images") or mask (role "masks") `bad` is corpus item `name`."""
    root = write_folder_source(tmp_path / "source")
    bad = root / role / f"bad{Path(name).suffix}"
    shutil.copyfile(write_broken_images(tmp_path / "corpus")[name], bad)
    other_role = "masks" if role == "images" else "images"
    good = good_mask() if other_role == "masks" else np.zeros((*IMAGE_SIZE, 3), dtype=np.uint8)
    Image.fromarray(good).save(root / other_role / "bad.png")
    return bad


# Images and masks of a folder source.


@pytest.mark.parametrize("name", sorted(BROKEN_IMAGES))
def test_broken_image_named_in_error(tmp_path, name):
    stage, advice = BROKEN_IMAGES[name]
    bad = source_with_bad_file(tmp_path, name, "images")
    root = bad.parents[1]
    if stage == "list":
        with pytest.raises(ValueError) as error:
            list_source("folder", root, source="mine")
    else:
        rows = list_source("folder", root, source="mine")
        assert str(bad) in rows["image_path"].tolist()
        with pytest.raises(ValueError) as error:
            SegmentationDataset(rows, crop_size=32)
    assert str(bad) in str(error.value)
    assert advice in str(error.value)


@pytest.mark.parametrize("name", sorted(BROKEN_IMAGES))
def test_broken_mask_named_in_error(tmp_path, name):
    _, advice = BROKEN_IMAGES[name]
    bad = source_with_bad_file(tmp_path, name, "masks")
    # Listing reads only image headers, so every broken mask fails when the samples load.
    with pytest.raises(ValueError) as error:
        load_folder_source(bad.parents[1])
    assert str(bad) in str(error.value)
    assert advice in str(error.value)


@pytest.mark.parametrize(
    ("stem", "expected"),
    [
        ("wrong_size", ("41 x 50 (H x W)", "check that the files belong together")),
        ("unknown_labels", ("values not in the value map: 7, 255", "Add them to value_map or fix the mask")),
    ],
)
def test_mask_mismatch_named_in_error(tmp_path, stem, expected):
    root = write_folder_source(tmp_path / "source")
    mask = write_mask_mismatch(root, stem)
    with pytest.raises(ValueError) as error:
        load_folder_source(root)
    assert str(mask) in str(error.value)
    for text in expected:
        assert text in str(error.value)


@pytest.mark.parametrize(
    ("name", "stage", "advice"),
    [
        ("nan_grey.tif", "load", "floating-point pixels (PIL mode 'F')"),
        ("nan_rgb.tif", "list", UNREADABLE),
    ],
)
def test_float_image_rejected(tmp_path, name, stage, advice):
    root = write_folder_source(tmp_path / "source")
    bad = root / "images" / "nan.tif"
    shutil.copyfile(write_float_tiffs(tmp_path / "corpus")[name], bad)
    Image.fromarray(good_mask()).save(root / "masks" / "nan.png")
    # NaN and inf pixels never reach a model, so no metric is computed from them.
    with pytest.raises(ValueError) as error:
        if stage == "list":
            list_source("folder", root, source="mine")
        else:
            SegmentationDataset(list_source("folder", root, source="mine"), crop_size=32)
    assert str(bad) in str(error.value)
    assert advice in str(error.value)


def test_float_mask_with_nan_rejected(tmp_path):
    root = write_folder_source(tmp_path / "source")
    bad = root / "masks" / "nan.tif"
    shutil.copyfile(write_float_tiffs(tmp_path / "corpus")["nan_grey.tif"], bad)
    Image.fromarray(np.zeros((*IMAGE_SIZE, 3), dtype=np.uint8)).save(root / "images" / "nan.png")
    with pytest.raises(ValueError) as error:
        load_folder_source(root)
    assert str(bad) in str(error.value)
    assert "NaN or infinite values in 15 pixels" in str(error.value)
    assert "save it as an 8-bit or 16-bit integer image" in str(error.value)


# The manifest command: bad data, configs and splits files.


def manifest_command(config: Path, output_dir: Path, *overrides: str) -> list[str]:
    sets = [f"run.output_dir={output_dir}", *overrides]
    return ["manifest", "--config", str(config), *[part for value in sets for part in ("--set", value)]]


@pytest.mark.parametrize("name", LISTING_FAILURES)
def test_manifest_command_keeps_previous_manifest(tmp_path, capsys, name):
    root = write_folder_source(tmp_path / "source")
    config = tmp_path / "config.yaml"
    config.write_text(folder_config_text(root))
    output = tmp_path / "runs"
    assert main(manifest_command(config, output)) == 0
    previous = file_digests(output)
    assert {"splits.json", "corpus/manifest.parquet", "corpus/config.yaml"} <= set(previous)
    capsys.readouterr()

    bad = root / "images" / f"new{Path(name).suffix}"
    shutil.copyfile(write_broken_images(tmp_path / "corpus")[name], bad)
    Image.fromarray(good_mask()).save(root / "masks" / "new.png")
    assert main(manifest_command(config, output)) == 2
    error = capsys.readouterr().err
    assert f"error: Cannot read image {bad}" in error or f"error: Image {bad}" in error
    assert "Traceback" not in error
    assert file_digests(output) == previous


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_bad_config_exits_2(tmp_path, capsys, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "yaml_payload_ran"
    root = write_folder_source(tmp_path / "source")
    path = write_bad_configs(tmp_path / "configs", root, marker)[name]
    assert main(["manifest", "--config", str(path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: config file {path}") or error.startswith(f"error: invalid config {path}")
    for text in BAD_CONFIGS[name]:
        assert text in error
    assert "Traceback" not in error
    assert not marker.exists()
    # The config failed before any work, so nothing was written.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["configs", "source"]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("teacher_train.epoch=3", "teacher_train.epoch: Extra inputs are not permitted"),
        ("teacher_train.epochs=-1", "teacher_train.epochs: Input should be greater than or equal to 1"),
        ("run.name=../escape", "run.name: String should match pattern"),
        ("teacher_train", "must look like section.key=value"),
        ("run.name.first=x", "'name' is a value, not a section"),
    ],
)
def test_bad_override_exits_2(tmp_path, capsys, override, expected):
    config = tmp_path / "config.yaml"
    config.write_text(folder_config_text(write_folder_source(tmp_path / "source")))
    assert main(manifest_command(config, tmp_path / "runs", override)) == 2
    error = capsys.readouterr().err
    assert expected in error
    assert "Traceback" not in error
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", sorted(BAD_SPLITS))
def test_bad_splits_file_kept(tmp_path, capsys, name):
    config = tmp_path / "config.yaml"
    config.write_text(folder_config_text(write_folder_source(tmp_path / "source")))
    splits = write_bad_splits(tmp_path / "splits")[name]
    before = splits.read_bytes()
    assert main(manifest_command(config, tmp_path / "runs", f"data.split.file={splits}")) == 2
    error = capsys.readouterr().err
    assert f"{splits} is not a valid splits file: {BAD_SPLITS[name]}" in error
    assert "Delete it to create it again" in error
    assert "Traceback" not in error
    # The file is reported, not replaced, and no manifest was written for the rejected splits.
    assert splits.read_bytes() == before
    assert not (tmp_path / "runs" / "corpus" / "manifest.parquet").exists()


# Checkpoints with pickled payloads.


def small_training_config(baby_config):
    return updated(
        baby_config,
        data={"scale": 1.0, "crop_size": 32, "augment": {"enabled": False}},
        tracking={"enabled": False},
    )


def test_pickled_optimizer_state_never_runs(baby_config, tmp_path):
    config = small_training_config(baby_config)
    rows = list_source("folder", write_folder_source(tmp_path / "source"), source="mine")
    rows["split"] = ["train"] * 4 + ["val"] * 2
    session = LocalSession(tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoint_000000"
    meta = dict(describe_model(config, "teacher"), epoch=1)
    save_checkpoint(checkpoint, build_model("teacher", config.model, 3), meta)
    marker = tmp_path / "pickle_payload_ran"
    state_file = write_pickle_payload(checkpoint / TRAINING_STATE_FILE, marker)
    job = TrainingJob(label="teacher", model_kind="teacher", optim=config.teacher_train)

    # A relaunch resumes from the latest checkpoint, whose optimizer state was replaced.
    with pytest.raises(UnsafeCheckpointError) as error:
        run_training(config, job, rows.to_dict(orient="records"), session)
    assert str(state_file) in str(error.value)
    assert "bad_inputs.record_payload" in str(error.value)
    assert "Delete the file to resume with a fresh optimizer state" in str(error.value)
    assert not marker.exists()


@pytest.fixture
def pickled_weights_checkpoint(baby_config, tmp_path):
    """A checkpoint whose model.safetensors is a torch.save pickle that would run a payload."""
    folder = tmp_path / "checkpoint"
    save_checkpoint(folder, build_model("student", baby_config.model, 3), describe_model(baby_config, "student"))
    write_pickle_payload(folder / MODEL_FILE, tmp_path / "pickle_payload_ran")
    return folder


def test_pickled_weights_export_exits_2(pickled_weights_checkpoint, tmp_path, capsys):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "MODEL_CARD.md").write_text("the bundle of an earlier export\n")
    previous = file_digests(bundle)
    command = ["export", "--config", str(BABY), "--checkpoint", str(pickled_weights_checkpoint),
               "--output", str(bundle), "--force", "--no-onnx"]
    assert main(command) == 2
    error = capsys.readouterr().err
    assert f"cannot read weights {pickled_weights_checkpoint / MODEL_FILE}" in error
    assert "Restore the checkpoint from its source" in error
    assert "Traceback" not in error
    assert not (tmp_path / "pickle_payload_ran").exists()
    # --force replaces a bundle only after the new one is complete, so the old one stays.
    assert file_digests(bundle) == previous


def test_pickled_weights_score_exits_2(pickled_weights_checkpoint, tmp_path, capsys):
    slides = write_good_slides(tmp_path / "slides", ("one.png",))["one.png"].parent
    output = tmp_path / "scores"
    command = ["score", "--config", str(BABY), "--set", "tracking.enabled=false",
               "--checkpoint", str(pickled_weights_checkpoint), "--input", str(slides), "--output", str(output)]
    assert main(command) == 2
    error = capsys.readouterr().err
    assert f"cannot read weights {pickled_weights_checkpoint / MODEL_FILE}" in error
    assert not (tmp_path / "pickle_payload_ran").exists()
    # The checkpoint is checked before anything is written.
    assert not output.exists()


@pytest.mark.parametrize(("content", "expected"), [("[]", "must be a JSON object, got list"), ("{", "is not valid JSON")])
def test_bad_checkpoint_description_exits_2(baby_config, tmp_path, capsys, content, expected):
    folder = tmp_path / "checkpoint"
    save_checkpoint(folder, build_model("student", baby_config.model, 3), describe_model(baby_config, "student"))
    (folder / META_FILE).write_text(content)
    command = ["export", "--config", str(BABY), "--checkpoint", str(folder), "--output", str(tmp_path / "b"), "--no-onnx"]
    assert main(command) == 2
    error = capsys.readouterr().err
    assert str(folder / META_FILE) in error
    assert expected in error
    assert "Traceback" not in error


def test_distill_rejects_pickled_teacher_early(baby_config, pickled_weights_checkpoint, tmp_path, capsys):
    runs = tmp_path / "runs"
    command = ["distill", "--config", str(BABY), "--set", f"run.output_dir={runs}", "--set", "tracking.enabled=false",
               "--teacher", str(pickled_weights_checkpoint)]
    assert main(command) == 2
    error = capsys.readouterr().err
    assert f"cannot read weights {pickled_weights_checkpoint / MODEL_FILE}" in error
    assert "Traceback" not in error
    assert not (tmp_path / "pickle_payload_ran").exists()
    # The teacher is checked on the driver before the manifest is built or Ray Train starts.
    assert not runs.exists()


def test_distill_names_pickle_beside_missing_weights(baby_config, tmp_path, capsys):
    folder = tmp_path / "teacher"
    save_checkpoint(folder, build_model("teacher", baby_config.model, 3), describe_model(baby_config, "teacher"))
    (folder / MODEL_FILE).unlink()
    write_pickle_payload(folder / "model.pt", tmp_path / "pickle_payload_ran")
    command = ["distill", "--config", str(BABY), "--set", f"run.output_dir={tmp_path / 'runs'}",
               "--set", "tracking.enabled=false", "--teacher", str(folder)]
    assert main(command) == 2
    error = capsys.readouterr().err
    assert f"checkpoint {folder} has no {MODEL_FILE} (found model.pt" in error
    assert "safetensors.torch.save_file" in error
    assert not (tmp_path / "pickle_payload_ran").exists()


# Scoring an archive with bad slides next to good ones.


def previous_slide_tables(slide_id: str) -> tuple[pa.Table, pa.Table]:
    """The tiles and summary tables of a slide scored by an earlier run, with one tile."""
    info = {"status": "ok", "error": "", "width": 128, "height": 128, "slide_mpp": 1.0, "slide_mpp_source": "override",
            "model_mpp": 1.0, "level": 0, "level_downsample": 1.0, "tiles_seen": 4, "tiles_kept": 1}
    rows = [
        {"slide_id": slide_id, "tile_index": -1, "status": "header", "error": "", "slide_info": json.dumps(info)},
        {"slide_id": slide_id, "tile_index": 0, "level": 0, "x": 0, "y": 0, "width": 64, "height": 64,
         "core_x0": 0, "core_y0": 0, "core_x1": 64, "core_y1": 64, "tissue_fraction": 0.5, "status": "ok",
         "error": "", "nuclei_owned": 1, "suspicion": 0.25, "nc_ratios": [0.2]},
    ]
    tiles = tile_table(pa.Table.from_pylist(rows, schema=STAGE_SCHEMA), "baby-student", "earlier")
    return tiles, slide_summary(slide_id, "earlier run", info, tiles, 10, "baby-student", "earlier")


@pytest.fixture
def baby_checkpoint(baby_config, tmp_path):
    folder = tmp_path / "checkpoint"
    torch.manual_seed(0)
    save_checkpoint(folder, build_model("student", baby_config.model, 3), describe_model(baby_config, "student"))
    return folder


@pytest.mark.ray
def test_bad_slides_fail_alone(ray_cluster, baby_config, baby_checkpoint, data_root, tmp_path):
    from cervi_ray.scoring.pipeline import score_archive

    work = tmp_path / "work"
    slides = work / "slides"
    bad = write_bad_slides(slides, data_root)
    write_good_slides(slides, ("good.png", "previous.png", "dotted.png"))
    elsewhere = write_good_slides(work / "elsewhere", ("relative.png", "absolute.png"))
    # Paths with "..", an absolute path outside the input folder and ids with "/" and "..".
    manifest = write_scoring_manifest(work / "slides.csv", [
        ("good.png", ""),
        ("previous.png", ""),
        ("dotted.png", ".."),
        ("../elsewhere/relative.png", "../../escape"),
        (str(elsewhere["absolute.png"]), "sub/dir"),
        *[(name, "") for name in sorted(bad)],
    ])

    # An earlier run completed "previous"; the user keeps notes in the output folder.
    output = work / "out"
    store = OutputStore(str(output))
    store.commit_slide("previous", *previous_slide_tables("previous"), b"\x89PNG earlier heatmap")
    (output / "notes.txt").write_text("kept by the user\n")
    earlier_outputs = file_digests(output)
    before = file_digests(work)

    config = updated(
        baby_config,
        scoring={"input": str(slides), "manifest": str(manifest), "checkpoint": str(baby_checkpoint),
                 "output": str(output), "tile_size": 64, "overlap": 0, "slide_mpp": 1.0, "tta": ["identity"],
                 "batch_size": 8},
        tracking={"enabled": False},
    )
    report = score_archive(config)

    # Good slides complete, each bad one fails alone with its file and the fix in its error.
    assert report.slides_already_done == 1
    assert report.statuses == {"ok": 4, "failed": len(bad)}
    summaries = pd.read_parquet(output / "slides").set_index("slide_id")
    assert sorted(summaries.index) == sorted(
        ["previous", "good", "slide", "escape", "sub__dir", *[Path(name).stem for name in bad]]
    )
    for name, path in bad.items():
        summary = summaries.loc[Path(name).stem]
        assert summary["status"] == "failed", name
        assert str(path) in summary["error"], name
        assert "Replace it with a complete copy in a supported format" in summary["error"], name
        assert summary["tiles_scored"] == 0, name
    assert "TIFF samples of type float32 are not supported" in summaries.loc["nan_rgb", "error"]
    assert "DecompressionBombError" in summaries.loc["bomb", "error"]
    tiles = pd.read_parquet(output / "tiles")
    for slide_id in ("good", "slide", "escape", "sub__dir"):
        assert summaries.loc[slide_id, "status"] == "ok", summaries.loc[slide_id, "error"]
        scored = tiles[tiles["slide_id"] == slide_id]
        assert len(scored) == summaries.loc[slide_id, "tiles_scored"] > 0
        assert np.isfinite(scored[["cytoplasm_fraction", "nucleus_fraction", "suspicion"]].to_numpy()).all()
    assert set(tiles["slide_id"]) == {"previous", "good", "slide", "escape", "sub__dir"}

    # Earlier results survive byte for byte, and nothing is written outside the output folder.
    after = file_digests(work)
    assert {name: after.get(f"out/{name}") for name in earlier_outputs} == {
        name: digest for name, digest in earlier_outputs.items()
    }
    changed = sorted(name for name in set(before) | set(after) if before.get(name) != after.get(name))
    assert changed
    assert [name for name in changed if not name.startswith("out/")] == []


# Credentials and the local Ray.

# Runs in a subprocess the three commands of a small job through the CLI's main, in one process
# and so one Ray. It then prints the local Ray's dashboard address, the addresses its port listens
# on (from /proc/net/tcp*) and the HTTP status of the job API there.
JOB_DRIVER = r"""
import json, sys, urllib.error, urllib.request
from cervi_ray.cli import main
from cervi_ray.config import save_config
from cervi_ray.config import load_config
from cervi_ray.pipeline import best_checkpoint_of_run

config_path, slides, scores = sys.argv[1:4]
common = ["--config", config_path]
assert main(["manifest", *common]) == 0, "manifest failed"
assert main(["train-teacher", *common]) == 0, "train-teacher failed"
best = best_checkpoint_of_run(load_config(config_path), "teacher")
assert best is not None, "training left no checkpoint"
score = ["score", *common, "--checkpoint", f"s3://{best.path}", "--input", slides, "--output", scores]
assert main(score) == 0, "score failed"

import ray
webui = ray._private.worker.global_worker.node.address_info["webui_url"]
port = int(webui.rsplit(":", 1)[1])
listening = []
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    with open(table) as stream:
        for line in stream.readlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:
                listening.append(address)
try:
    status = urllib.request.urlopen(f"http://{webui}/api/jobs/", timeout=10).status
except urllib.error.HTTPError as error:
    status = error.code
print("LOCAL_RAY " + json.dumps({"webui_url": webui, "listening": listening, "job_api_status": status}))
"""
LOOPBACK_V4 = "0100007F"  # 127.0.0.1 as /proc/net/tcp prints it (little-endian hex)


def list_bucket_objects(endpoint: str, bucket: str) -> dict[str, bytes]:
    client = boto3.client("s3", endpoint_url=endpoint)
    objects = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            objects[item["Key"]] = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
    return objects


@pytest.mark.ray
def test_credentials_never_written(ray_cluster, baby_config, s3_server, tmp_path):
    secret = f"cervi-ray-test-SECRET-{uuid.uuid4().hex}"
    key_id = f"CERVIRAYTESTKEY{uuid.uuid4().hex[:12].upper()}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="runs")
    source = write_folder_source(tmp_path / "source", stems=tuple("abcdefgh"))
    slides = write_good_slides(tmp_path / "slides", ("one.png",))["one.png"].parent
    runs, scores = tmp_path / "runs", tmp_path / "scores"
    # The baby profile on the small folder source: 1 epoch on 1 worker, checkpoints in the loopback
    # S3 server, and tracking on, so the MLflow store is searched too.
    config = updated(
        baby_config,
        data={"sources": [{"name": "mine", "kind": "folder", "path": str(source)}], "scale": 1.0, "crop_size": 32},
        teacher_train={"epochs": 1, "batch_size_per_worker": 2},
        scaling={"num_workers": 1},
        run={"output_dir": str(runs), "storage_path": "s3://runs/ray", "storage_endpoint_url": s3_server},
        scoring={"endpoint_url": s3_server, "slide_mpp": 0.25, "tile_size": 64, "overlap": 0,
                 "tta": ["identity"], "batch_size": 8},
        tracking={"enabled": True},
    )
    config_path = tmp_path / "job.yaml"
    save_config(config, config_path)
    # A short folder for Ray's session files, because Unix socket paths are limited to 107 bytes.
    ray_temp = Path(tempfile.mkdtemp(prefix="crt", dir="/tmp"))

    env = {key: value for key, value in os.environ.items() if not key.startswith(("AWS_", "RAY_"))}
    env.update({
        "AWS_ACCESS_KEY_ID": key_id,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_SESSION_TOKEN": f"{secret}-token",
        "AWS_DEFAULT_REGION": "us-east-1",
        # Only the loopback S3 server may be reached: no metadata service, no profile files.
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ENDPOINT_URL": s3_server,
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "NO_PROXY": "127.0.0.1,localhost",
        "RAY_TMPDIR": str(ray_temp),
        "TMPDIR": str(ray_temp),
    })
    try:
        result = subprocess.run(
            [sys.executable, "-c", JOB_DRIVER, str(config_path), str(slides), str(scores)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        )
        logs = result.stdout + result.stderr
        assert result.returncode == 0, logs[-4000:]

        # The run wrote what it should, then no file, object or log line contains either marker.
        assert (runs / "corpus" / "manifest.parquet").is_file() or list(runs.rglob("manifest.parquet"))
        assert pd.read_parquet(scores / "slides")["status"].tolist() == ["ok"]
        files = [path for folder in (runs, scores, ray_temp) for path in folder.rglob("*") if path.is_file()]
        files.append(config_path)
        ray_logs = [path for path in files if ray_temp in path.parents and path.parent.name == "logs"]
        assert ray_logs, f"no Ray log files under {ray_temp}"
        objects = list_bucket_objects(s3_server, "runs")
        assert any(key.endswith(META_FILE) for key in objects)
        for marker in (secret, key_id):
            assert marker not in logs
            assert [str(path) for path in files if marker.encode() in path.read_bytes()] == []
            assert [key for key, data in objects.items() if marker.encode() in data] == []

        # The local Ray that the commands started serves its dashboard and job API on 127.0.0.1.
        local_ray = json.loads(logs.split("LOCAL_RAY ", 1)[1].splitlines()[0])
        assert local_ray["webui_url"].startswith("127.0.0.1:")
        assert local_ray["listening"] == [LOOPBACK_V4]
        assert local_ray["job_api_status"] in (200, 401)  # 401: token authentication is on
    finally:
        shutil.rmtree(ray_temp, ignore_errors=True)
