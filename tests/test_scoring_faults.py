"""Scoring survives the loss of its inference actor: every tile is scored exactly once.

Real ISBI 2015 EDF frames are scored as single-level slides by an oracle model that logs each
forward pass (with its process id) to a file. Once that log shows tiles flowing, the test
kills the inference actor's process with SIGKILL and checks the outputs after the job (or its
rerun) completes.
"""

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from torch import nn

from cervi_ray.data.dataset import IMAGE_MEAN, IMAGE_STD
from cervi_ray.scoring.pipeline import SlideCollector, score_archive
from cervi_ray.scoring.slides import SlideStorage
from cervi_ray.scoring.stages import HEADER_INDEX, STAGE_SCHEMA, StageSettings, plan_slide

ORACLE_META = {"model_kind": "oracle", "label_mode": "full", "code_version": "test", "training_resolution": {"mpp": 1.0}}
SCORING = {"tile_size": 128, "overlap": 16, "slide_mpp": 1.0, "tta": ["identity", "hflip"], "batch_size": 16}
SEGMENTER_CLASS = "TileSegmenter"  # Ray Data names the actor class MapWorker(MapBatches(TileSegmenter))
FLOWING_FORWARDS = 3  # forward passes logged before the kill
TIMEOUT_S = 90.0


def logging_oracle(log: Path) -> nn.Module:
    """A grey-level oracle (below 80 nucleus, below 200 cytoplasm) that logs its process id per forward pass.

    The class is local to this function, so Ray pickles it by value; actors cannot import test files.
    """

    class LoggingOracle(nn.Module):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            with open(log, "a") as stream:
                stream.write(f"{os.getpid()}\n")
            mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
            std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
            grey = ((images * std + mean) * 255).mean(dim=1)  # (B, H, W), undoing to_tensor
            labels = torch.where(grey < 80, 2, torch.where(grey < 200, 1, 0))
            return nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float() * 10  # (B, 3, H, W) logits

    return LoggingOracle()


def forward_pids(log: Path) -> list[int]:
    return [int(line) for line in log.read_text().split()] if log.exists() else []


def wait_for(condition, description: str, timeout: float = TIMEOUT_S, interval: float = 0.05):
    """Poll `condition` until it returns a true value, and return that value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {description}")


def segmenter_actor():
    """Return the live inference actor of the scoring chain, or None while it is not running."""
    import ray
    from ray.util.state import list_actors

    # The explicit address keeps the state API on this test's cluster when other local clusters run.
    actors = list_actors(
        address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")], detail=True,
        raise_on_missing_output=False,
    )
    found = [actor for actor in actors if SEGMENTER_CLASS in actor.class_name]
    return found[0] if found else None


def expected_tiles(config, slides: Path) -> dict[str, set[tuple[int, int]]]:
    """Plan each slide as the chain does and return its kept tiles' level-0 (x, y)."""
    scoring = config.scoring
    settings = StageSettings(
        tile_size=scoring.tile_size, overlap=scoring.overlap, min_tissue_fraction=scoring.min_tissue_fraction,
        model_mpp=1.0, slide_mpp=scoring.slide_mpp, thumbnail_size=scoring.thumbnail_size, storage=SlideStorage(),
        views=len(scoring.tta), has_cytoplasm=True, write_masks=False,
    )
    expected = {}
    for path in sorted(slides.iterdir()):
        rows = plan_slide({"slide_id": path.stem, "uri": str(path)}, settings)
        assert json.loads(rows[0]["slide_info"])["status"] == "ok", rows[0]["slide_info"]
        expected[path.stem] = {(row["x"], row["y"]) for row in rows if row["tile_index"] != HEADER_INDEX}
    return expected


@pytest.fixture
def edf_slides(data_root, tmp_path) -> Path:
    """The ISBI 2015 EDF frames (1024 x 1024 grey PNGs) as a folder of single-level slides."""
    folder = tmp_path / "slides"
    folder.mkdir()
    frames = sorted((data_root / "isbi2015" / "Training" / "EDF").glob("frame*.png"))
    assert len(frames) >= 6, f"expected the ISBI 2015 EDF frames under {data_root}, found {len(frames)}"
    for frame in frames:
        (folder / frame.name).symlink_to(frame)
    return folder


def stage_rows(slide_id: str, indices: list[int], tiles_kept: int = 3) -> pa.Table:
    """Return summarise-stage rows of `slide_id`: a header for index -1, an ok tile for the others."""
    rows = []
    for index in indices:
        header = index == HEADER_INDEX
        rows.append({
            "slide_id": slide_id, "tile_index": index, "x": 10 * index, "y": 0, "status": "header" if header else "ok",
            "error": "", "slide_info": json.dumps({"status": "ok", "tiles_kept": tiles_kept}) if header else "",
            "thumbnail": b"",
        })
    return pa.Table.from_pylist(rows, schema=STAGE_SCHEMA)


def test_collector_drops_repeated_rows():
    collector = SlideCollector()

    assert collector.add(stage_rows("a", [HEADER_INDEX, 0, 1])) == []
    # A retried batch delivers tile 1 and the header again, then the missing tile 2 arrives.
    assert collector.add(stage_rows("a", [1, HEADER_INDEX])) == []
    completed = collector.add(stage_rows("a", [1, 2]))

    assert [slide_id for slide_id, *_ in completed] == ["a"]
    _, info, _, rows = completed[0]
    assert info["tiles_kept"] == 3
    assert sorted(rows["tile_index"].to_pylist()) == [HEADER_INDEX, 0, 1, 2]
    # Rows of a slide already returned do not start it over.
    assert collector.add(stage_rows("a", [2])) == []
    assert collector.unfinished() == []


@pytest.mark.ray
def test_killed_actor_scores_each_tile_once(ray_cluster, baby_config, edf_slides, tmp_path):
    tree = baby_config.model_dump(mode="json")
    tree["scoring"].update(input=str(edf_slides), output=str(tmp_path / "scores"), **SCORING)
    tree["tracking"].update(enabled=False)
    config = type(baby_config).model_validate(tree)
    log = tmp_path / "forwards.log"
    model = logging_oracle(log)

    outcome: dict = {}

    def run() -> None:
        try:
            outcome["report"] = score_archive(config, model, ORACLE_META)
        except BaseException as error:  # re-raised below, in the test's thread
            outcome["error"] = error

    job = threading.Thread(target=run, name="score_archive", daemon=True)
    job.start()
    wait_for(lambda: len(forward_pids(log)) >= FLOWING_FORWARDS, f"{FLOWING_FORWARDS} forward passes")
    actor = wait_for(segmenter_actor, "the inference actor in the state API", timeout=10)
    os.kill(actor.pid, signal.SIGKILL)
    job.join(TIMEOUT_S)
    assert not job.is_alive(), f"score_archive did not finish within {TIMEOUT_S:.0f} s of the kill"
    if "error" in outcome:
        raise outcome["error"]

    first = outcome["report"]
    pids = forward_pids(log)
    assert actor.pid in pids
    assert pids[-1] != actor.pid, "no forward pass ran after the kill; the kill came too late to test anything"
    if set(first.statuses) != {"ok"}:
        rerun = score_archive(config, model, ORACLE_META)
        assert set(rerun.statuses) == {"ok"}, rerun.statuses
        assert rerun.slides_already_done + sum(rerun.statuses.values()) == rerun.slides_listed

    expected = expected_tiles(config, edf_slides)
    tiles = pd.read_parquet(tmp_path / "scores" / "tiles")
    summaries = pd.read_parquet(tmp_path / "scores" / "slides")
    assert sorted(summaries["slide_id"]) == sorted(expected)
    assert (summaries["status"] == "ok").all(), summaries[["slide_id", "status", "error"]]
    assert (tiles["status"] == "ok").all()
    for slide_id, cells in expected.items():
        rows = tiles[tiles["slide_id"] == slide_id]
        coordinates = list(zip(rows["x"], rows["y"]))
        assert len(coordinates) == len(set(coordinates)), f"{slide_id}: duplicate tiles"
        assert set(coordinates) == cells, f"{slide_id}: tiles missing or unexpected"
        summary = summaries.set_index("slide_id").loc[slide_id]
        assert summary["tiles_scored"] == len(cells)
    assert np.isfinite(tiles["suspicion"]).all()
