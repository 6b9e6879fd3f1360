"""The `score` command: options override the scoring section, and a small run from the CLI."""

import argparse
import runpy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cervi_ray import cli
from cervi_ray.checkpoint import describe_model, save_checkpoint
from cervi_ray.models import build_student
from cervi_ray.scoring import command, pipeline
from cervi_ray.scoring.pipeline import ScoringReport

BABY = Path(__file__).resolve().parents[1] / "configs" / "baby.yaml"


def test_options_override_scoring(baby_config, monkeypatch):
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(["--input", "s3://b/slides", "--checkpoint", "ckpt", "--output", "out", "--endpoint-url", "http://127.0.0.1:9"])
    seen = {}

    def fake_score(config):
        seen["scoring"] = config.scoring
        return ScoringReport("out", 0, 0)

    monkeypatch.setattr(pipeline, "score_archive", fake_score)
    baby_config.scoring.manifest = "kept.csv"
    command.run(baby_config, args)
    scoring = seen["scoring"]
    assert (scoring.input, scoring.checkpoint, scoring.output) == ("s3://b/slides", "ckpt", "out")
    assert scoring.endpoint_url == "http://127.0.0.1:9"
    # Options left out keep the config's value.
    assert scoring.manifest == "kept.csv"


def test_missing_output_is_a_clean_error(tmp_path, capsys):
    code = cli.main(["score", "--config", str(BABY), "--input", str(tmp_path), "--checkpoint", str(tmp_path)])
    assert code == 2
    assert "--output" in capsys.readouterr().err


def test_job_entrypoint_importable():
    namespace = runpy.run_path(str(Path(__file__).resolve().parents[1] / "jobs" / "score.py"), run_name="not_main")
    assert namespace["main"] is cli.main


@pytest.mark.ray
def test_score_command_end_to_end(ray_cluster, baby_config, tmp_path, capsys):
    slides = tmp_path / "slides"
    slides.mkdir()
    pixels = np.full((120, 160), 235, dtype=np.uint8)
    pixels[30:70, 40:90] = 140  # one dark cell
    pixels[45:55, 60:70] = 40
    Image.fromarray(pixels).save(slides / "one.png")
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "checkpoint", build_student(baby_config.model, 3), describe_model(baby_config, "student"))

    code = cli.main([
        "score", "--config", str(BABY), "--input", str(slides), "--checkpoint", str(tmp_path / "checkpoint"),
        "--output", str(tmp_path / "out"), "--set", "scoring.tile_size=64", "--set", "scoring.overlap=0",
        "--set", "scoring.slide_mpp=1.0", "--set", f"run.output_dir={tmp_path / 'runs'}",
    ])
    assert code == 0
    assert "1 listed" in capsys.readouterr().out
    summary = pd.read_parquet(tmp_path / "out" / "slides")
    assert summary["status"].tolist() == ["ok"]
    assert summary["tiles_scored"].iloc[0] >= 1


@pytest.mark.ray
def test_bundle_scores_real_image(ray_cluster, baby_config, data_root, tmp_path, capsys):
    # A real 1024 x 1024 EDF frame as a single-level slide, scored with an exported bundle as the model.
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "frame004.png").symlink_to(data_root / "isbi2015" / "Training" / "EDF" / "frame004.png")
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "checkpoint", build_student(baby_config.model, 3), describe_model(baby_config, "student"))
    bundle = tmp_path / "bundle"
    assert cli.main(["export", "--checkpoint", str(tmp_path / "checkpoint"), "--output", str(bundle), "--no-onnx"]) == 0
    assert (bundle / "MODEL_CARD.md").is_file()

    # The baby model has no training resolution: model_mpp 1.0 and slide_mpp 4.0 shrink the frame to 256 x 256.
    code = cli.main([
        "score", "--config", str(BABY), "--input", str(slides), "--checkpoint", str(bundle),
        "--output", str(tmp_path / "out"), "--set", "scoring.tile_size=64", "--set", "scoring.overlap=0",
        "--set", "scoring.model_mpp=1.0", "--set", "scoring.slide_mpp=4.0", "--set", "tracking.enabled=false",
        "--set", f"run.output_dir={tmp_path / 'runs'}",
    ])
    assert code == 0, capsys.readouterr().err[-2000:]
    summary = pd.read_parquet(tmp_path / "out" / "slides")
    assert summary["slide_id"].tolist() == ["frame004"]
    assert summary["status"].tolist() == ["ok"]
    tiles = pd.read_parquet(tmp_path / "out" / "tiles")
    assert len(tiles) == summary["tiles_scored"].iloc[0] > 0
    assert tiles["model_name"].nunique() == 1
    # Level-0 coordinates: every tile lies inside the 1024 x 1024 frame.
    assert (tiles["x"] + tiles["width"]).max() <= 1024
    assert (tiles["y"] + tiles["height"]).max() <= 1024
