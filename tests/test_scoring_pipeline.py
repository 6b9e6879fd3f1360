"""The scoring job on a local Ray: real slides from a folder and from S3, oracle models, resume."""

import shutil
from pathlib import Path

import boto3
import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from skimage.draw import disk
from torch import nn

from cervi_ray.checkpoint import describe_model, save_checkpoint
from cervi_ray.data.dataset import IMAGE_MEAN, IMAGE_STD
from cervi_ray.models import build_student
from cervi_ray.scoring.grid import make_grid
from cervi_ray.scoring.postprocess import tile_statistics
from cervi_ray.scoring.pipeline import score_archive

pytestmark = pytest.mark.ray

EDF_IMAGES = ("EDF000.png", "EDF001.png")
SVS = "cmu-1-small-region.svs"
ORACLE_META = {"model_kind": "oracle", "label_mode": "full", "code_version": "test",
               "training_resolution": {"mpp": 1.0}}


def intensity_oracle() -> nn.Module:
    """A model whose labels follow grey level: below 80 nucleus, below 200 cytoplasm, else background.

    The class is local to this function, so Ray pickles it by value; actors cannot import test files.
    """

    class IntensityOracle(nn.Module):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
            std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
            grey = ((images * std + mean) * 255).mean(dim=1)  # (B, H, W), undoing to_tensor
            labels = torch.where(grey < 80, 2, torch.where(grey < 200, 1, 0))
            return nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float() * 10  # (B, 3, H, W) logits

    return IntensityOracle()


def cell_slide(path: Path, seed: int, size=(200, 300), cells=8) -> np.ndarray:
    """Write a PNG of separate round cells on a white background; return its true labels."""
    rng = np.random.default_rng(seed)
    height, width = size
    grey = np.full(size, 240, dtype=np.uint8)
    labels = np.zeros(size, dtype=np.uint8)
    placed: list[tuple[int, int]] = []
    while len(placed) < cells:
        row, col = int(rng.integers(15, height - 15)), int(rng.integers(15, width - 15))
        if all((row - r) ** 2 + (col - c) ** 2 > 30**2 for r, c in placed):
            placed.append((row, col))
            radius, nucleus = int(rng.integers(8, 13)), int(rng.integers(3, 6))
            rows, cols = disk((row, col), radius, shape=size)
            grey[rows, cols], labels[rows, cols] = 150, 1
            rows, cols = disk((row, col), nucleus, shape=size)
            grey[rows, cols], labels[rows, cols] = 40, 2
    Image.fromarray(grey).save(path)
    return labels


def configure(baby_config, **scoring):
    tree = baby_config.model_dump(mode="json")
    tree["scoring"].update(scoring)
    return type(baby_config).model_validate(tree)


@pytest.fixture
def baby_checkpoint(baby_config, tmp_path):
    folder = tmp_path / "checkpoint"
    torch.manual_seed(0)
    save_checkpoint(folder, build_student(baby_config.model, 3), describe_model(baby_config, "student"))
    return folder


@pytest.fixture
def real_slides(data_root, tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in EDF_IMAGES:
        shutil.copy(data_root / "isbi2014" / "edf_real" / name, folder / name)
    shutil.copy(data_root / "wsi" / SVS, folder / SVS)
    return folder


def read_dataset(root: str, filesystem=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    tiles = pq.read_table(f"{root}/tiles", filesystem=filesystem).to_pandas()
    slides = pq.read_table(f"{root}/slides", filesystem=filesystem).to_pandas()
    return tiles, slides.set_index("slide_id")


def check_real_results(tiles: pd.DataFrame, slides: pd.DataFrame) -> None:
    assert set(slides.index) >= {"EDF000", "EDF001", "cmu-1-small-region"}
    for slide_id in ("EDF000", "EDF001", "cmu-1-small-region"):
        summary = slides.loc[slide_id]
        assert summary["status"] == "ok", summary["error"]
        assert summary["tiles_scored"] == (tiles["slide_id"] == slide_id).sum()
        assert summary["tiles_scored"] + summary["tiles_skipped_background"] == summary["tiles_seen"]
        assert summary["model_name"] == "baby-student"
    # EDF images at 0.25 microns (override) for a 1-micron model: 256 model pixels, 2 x 2 tiles of 192.
    assert slides.loc["EDF000", "tiles_seen"] == 4
    assert slides.loc["EDF000", "slide_mpp_source"] == "override"
    # The SVS records 0.499 microns: 1107 x 1480 model pixels, 6 x 8 tiles.
    assert slides.loc["cmu-1-small-region", "tiles_seen"] == 48
    assert slides.loc["cmu-1-small-region", "slide_mpp"] == pytest.approx(0.499)
    assert 10 <= slides.loc["cmu-1-small-region", "tiles_scored"] < 48
    assert not tiles.duplicated(["slide_id", "tile_index"]).any()
    for column in ("cytoplasm_fraction", "nucleus_fraction", "tta_disagreement", "suspicion"):
        assert tiles[column].between(0, 1).all(), column


def test_real_slides_from_folder(ray_cluster, baby_config, baby_checkpoint, real_slides, tmp_path):
    (real_slides / "broken.svs").write_text("not a slide")
    (real_slides / "empty.png").write_bytes(b"")
    output = tmp_path / "results"
    config = configure(
        baby_config, input=str(real_slides), checkpoint=str(baby_checkpoint), output=str(output),
        tile_size=192, overlap=0, slide_mpp=0.25, write_masks=True,
    )
    report = score_archive(config)

    assert report.statuses == {"ok": 3, "failed": 2}
    tiles = pd.read_parquet(output / "tiles")
    slides = pd.read_parquet(output / "slides").set_index("slide_id")
    check_real_results(tiles, slides)
    # Bad files are recorded with their error; the other slides completed.
    assert slides.loc["broken", "status"] == "failed"
    assert "broken.svs" in slides.loc["broken", "error"]
    assert "empty.png" in slides.loc["empty", "error"]
    assert sorted(path.name for path in (output / "heatmaps").iterdir()) == [
        "EDF000.png", "EDF001.png", "cmu-1-small-region.png",
    ]
    assert tiles["mask_png"].map(lambda data: data[:8] == b"\x89PNG\r\n\x1a\n").all()


def test_real_slides_from_s3(ray_cluster, baby_config, baby_checkpoint, real_slides, s3_server):
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket="archive")
    for path in real_slides.iterdir():
        client.upload_file(str(path), "archive", f"slides/{path.name}")
    for path in baby_checkpoint.iterdir():
        client.upload_file(str(path), "archive", f"models/baby/{path.name}")
    config = configure(
        baby_config, input="s3://archive/slides", checkpoint="s3://archive/models/baby",
        output="s3://archive/results", endpoint_url=s3_server, tile_size=192, overlap=0, slide_mpp=0.25,
    )
    report = score_archive(config)

    assert report.statuses == {"ok": 3}
    filesystem = pafs.S3FileSystem(endpoint_override=s3_server.removeprefix("http://"), scheme="http")
    tiles, slides = read_dataset("archive/results", filesystem)
    check_real_results(tiles, slides)
    keys = {item["Key"] for item in client.list_objects_v2(Bucket="archive", Prefix="results/")["Contents"]}
    assert {"results/heatmaps/EDF000.png", "results/heatmaps/cmu-1-small-region.png", "results/run.json"} <= keys
    # Only folder markers (keys ending in "/") may remain under _staging.
    assert [key for key in keys if "/_staging/" in key and not key.endswith("/")] == []


def oracle_config(baby_config, slides, output, **scoring):
    return configure(
        baby_config, input=str(slides), output=str(output), tile_size=64, overlap=16, slide_mpp=1.0,
        tta=["identity", "hflip", "rot90"], batch_size=6, **scoring,
    )


def test_oracle_tiles_exact(ray_cluster, baby_config, tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    truth = {f"cells{seed}": cell_slide(slides / f"cells{seed}.png", seed) for seed in (1, 2)}
    report = score_archive(oracle_config(baby_config, slides, tmp_path / "out"), intensity_oracle(), ORACLE_META)
    assert report.statuses == {"ok": 2}

    tiles = pd.read_parquet(tmp_path / "out" / "tiles")
    summaries = pd.read_parquet(tmp_path / "out" / "slides").set_index("slide_id")
    grid = make_grid(300, 200, 64, 16)
    for slide_id, labels in truth.items():
        rows = tiles[tiles["slide_id"] == slide_id].set_index("tile_index")
        # Every grid tile appears once, kept or skipped, and kept tiles hold cells.
        assert rows.index.is_unique
        assert summaries.loc[slide_id, "tiles_seen"] == len(grid)
        assert len(rows) + summaries.loc[slide_id, "tiles_skipped_background"] == len(grid)
        for index, row in rows.iterrows():
            x0, y0, x1, y1 = grid.boxes[index]
            assert (row["x"], row["y"], row["width"], row["height"]) == (x0, y0, 64, 64)
            tile_labels = labels[y0:y1, x0:x1]
            assert tile_labels.any()
            core = tuple(int(value) for value in grid.cores[index] - np.tile(grid.boxes[index, :2], 2))
            expected = tile_statistics(tile_labels, np.zeros(tile_labels.shape), core, mpp=1.0)
            assert row["nucleus_fraction"] == pytest.approx(expected.nucleus_fraction)
            assert row["cytoplasm_fraction"] == pytest.approx(expected.cytoplasm_fraction)
            assert row["nucleus_count"] == expected.nucleus_count
            assert row["nuclei_owned"] == expected.nuclei_owned
            assert np.allclose(row["nc_ratios"], expected.owned_nc_ratios)
            assert row["suspicion"] == pytest.approx(expected.suspicion, abs=1e-6)
            # The oracle commutes with flips and rotations, so the TTA views agree.
            assert row["tta_disagreement"] == 0.0
        # Each drawn cell is counted once, although tiles overlap.
        assert summaries.loc[slide_id, "nuclei_counted"] == 8


def test_rerun_after_interruption(ray_cluster, baby_config, tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    for seed in (3, 4, 5):
        cell_slide(slides / f"cells{seed}.png", seed)
    output = tmp_path / "out"
    config = oracle_config(baby_config, slides, output)
    first = score_archive(config, intensity_oracle(), ORACLE_META)
    assert first.statuses == {"ok": 3}
    complete = pd.read_parquet(output / "tiles")

    # Interrupt: cells3 lost its summary after its tiles were moved; cells4 lost both files;
    # and a temporary file of the interrupted run is left behind.
    (output / "slides" / "cells3.parquet").unlink()
    (output / "slides" / "cells4.parquet").unlink()
    (output / "tiles" / "cells4.parquet").unlink()
    (output / "_staging" / "old-run").mkdir(parents=True)
    (output / "_staging" / "old-run" / "cells4.tiles.parquet").write_bytes(b"partial")

    second = score_archive(config, intensity_oracle(), ORACLE_META)
    assert second.slides_already_done == 1
    assert second.statuses == {"ok": 2}
    tiles = pd.read_parquet(output / "tiles")
    summaries = pd.read_parquet(output / "slides")
    assert sorted(summaries["slide_id"]) == ["cells3", "cells4", "cells5"]
    assert not tiles.duplicated(["slide_id", "tile_index"]).any()
    key = ["slide_id", "tile_index"]
    assert tiles.sort_values(key)[key].values.tolist() == complete.sort_values(key)[key].values.tolist()
    assert not any((output / "_staging").rglob("*.parquet"))

    # A third run finds everything complete and scores nothing.
    third = score_archive(config, intensity_oracle(), ORACLE_META)
    assert third.slides_already_done == 3
    assert not third.statuses


def test_hostile_slide_ids_stay_in_output(ray_cluster, baby_config, tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    cell_slide(slides / "a.png", 6, size=(100, 100), cells=2)
    cell_slide(slides / "b.png", 7, size=(100, 100), cells=2)
    cell_slide(slides / "c.png", 8, size=(100, 100), cells=2)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,slide_id\na.png,../../escape\nb.png,sub/dir\\name\nc.png,..\n")
    output = tmp_path / "nested" / "out"
    config = oracle_config(baby_config, slides, output, manifest=str(manifest))
    report = score_archive(config, intensity_oracle(), ORACLE_META)

    assert report.statuses == {"ok": 3}
    # Results stay under the output prefix. The MLflow and TensorBoard records of the run go to
    # run.output_dir, the place the config names for them.
    tracking_dir = Path(config.run.output_dir)
    written = [path for path in tmp_path.rglob("*") if path.is_file() and slides not in path.parents]
    outside = [path for path in written if output not in path.parents and path != manifest]
    assert [path for path in outside if tracking_dir not in path.parents] == []
    assert sorted(pd.read_parquet(output / "slides")["slide_id"]) == ["escape", "slide", "sub__dir__name"]


def test_rerun_with_slide_mpp_rescores_failed(ray_cluster, baby_config, baby_checkpoint, real_slides, tmp_path):
    output = tmp_path / "results"
    first = configure(
        baby_config, input=str(real_slides), checkpoint=str(baby_checkpoint), output=str(output),
        tile_size=192, overlap=0,
    )
    # The EDF PNGs carry no resolution, so they fail; the SVS records its own.
    assert score_archive(first).statuses == {"ok": 1, "failed": 2}

    second = configure(
        baby_config, input=str(real_slides), checkpoint=str(baby_checkpoint), output=str(output),
        tile_size=192, overlap=0, slide_mpp=0.25,
    )
    report = score_archive(second)
    assert report.slides_already_done == 1
    assert report.statuses == {"ok": 2}
    tiles, slides = read_dataset(str(output))
    check_real_results(tiles, slides)
