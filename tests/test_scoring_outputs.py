"""Slide listing, safe slide ids, the output layout, commits, summaries and heatmaps."""

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

from cervi_ray.scoring.outputs import (
    CommittedSlide,
    OutputStore,
    check_slide_id,
    render_heatmap,
    slide_summary,
    tile_table,
)
from cervi_ray.scoring.slides import SlideStorage
from cervi_ray.scoring.pipeline import warn_changed_sources
from cervi_ray.scoring.sources import SlideSource, assign_slide_ids, list_slides, safe_slide_id
from cervi_ray.scoring.stages import STAGE_SCHEMA

HOSTILE_NAMES = ["../../etc/passwd", "..", ".", "/abs/path/slide", "a\\..\\..\\b", "..\\x", ".hidden", "_private", ""]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_safe_id_is_one_plain_file_name(name):
    slide_id = safe_slide_id(name)
    assert slide_id
    assert "/" not in slide_id
    assert "\\" not in slide_id
    assert not slide_id.startswith((".", "_"))
    assert check_slide_id(slide_id) == slide_id


def test_safe_id_readable():
    assert safe_slide_id("batch 1/slide#7") == "batch_1__slide_7"
    assert safe_slide_id("x" * 500).endswith(safe_slide_id("x" * 500)[-8:])
    assert len(safe_slide_id("x" * 500)) == 120


def test_colliding_ids_get_hash_suffix():
    ids = assign_slide_ids(["a/b", "a__b", "C", "c", "other"])
    assert len(set(ids)) == 5
    assert ids[4] == "other"
    assert ids[0].startswith("a__b-")
    assert ids[1].startswith("a__b-")


def test_repeated_name_rejected():
    with pytest.raises(ValueError, match="more than once"):
        assign_slide_ids(["x", "x"])


@pytest.mark.parametrize("slide_id", ["../x", "a/b", "..", ".x", "_x", "a\\b", ""])
def test_check_slide_id_rejects_paths(slide_id):
    with pytest.raises(ValueError, match="not a safe file name"):
        check_slide_id(slide_id)


def test_list_local_folder(tmp_path):
    for name in ("b.svs", "a.png", "sub/c.tif", "notes.txt", ".hidden/d.png", "sub/e.PNG"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    slides = list_slides(str(tmp_path), None, SlideStorage())
    assert [slide.name for slide in slides] == ["a", "b", "sub/c", "sub/e"]
    assert [slide.slide_id for slide in slides] == ["a", "b", "sub__c", "sub__e"]
    assert slides[0].uri == str(tmp_path / "a.png")


def test_listing_names_files_sharing_a_name(tmp_path):
    for name in ("a.png", "a.tif", "b.svs"):
        (tmp_path / name).write_bytes(b"x")

    with pytest.raises(ValueError) as raised:
        list_slides(str(tmp_path), None, SlideStorage())
    message = str(raised.value)
    assert f"'a': {tmp_path / 'a.png'}, {tmp_path / 'a.tif'}" in message
    assert "slide_id column" in message


def test_listing_skips_output_inside_input(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "results" / "heatmaps").mkdir(parents=True)
    (tmp_path / "results" / "heatmaps" / "a.png").write_bytes(b"x")
    slides = list_slides(str(tmp_path), None, SlideStorage(), exclude=str(tmp_path / "results"))
    assert [slide.name for slide in slides] == ["a"]


def test_manifest_csv_with_ids(tmp_path):
    (tmp_path / "slides").mkdir()
    manifest = tmp_path / "list.csv"
    manifest.write_text(f"path,slide_id\none.png,../../escape\n{tmp_path}/abs.svs,\n")
    slides = list_slides(str(tmp_path / "slides"), str(manifest), SlideStorage())
    assert [slide.uri for slide in slides] == [str(tmp_path / "slides" / "one.png"), str(tmp_path / "abs.svs")]
    assert slides[0].slide_id == "escape"
    assert slides[1].name == f"{str(tmp_path).lstrip('/')}/abs"


def test_manifest_text_needs_input_for_relative(tmp_path):
    manifest = tmp_path / "list.txt"
    manifest.write_text("# slides\nrel/one.png\n")
    with pytest.raises(ValueError, match="--input"):
        list_slides(None, str(manifest), SlideStorage())


def test_missing_input_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="--input"):
        list_slides(str(tmp_path / "nope"), None, SlideStorage())


def _stage_rows(slide_id="s1", suspicions=(0.2, 0.9, 0.5), failed=()):
    """Stage rows of one slide: a header and a tile per suspicion value, in reverse grid order."""
    rows = [{"slide_id": slide_id, "tile_index": -1, "status": "header", "error": "", "slide_info": "{}", "thumbnail": b""}]
    for index, suspicion in reversed(list(enumerate(suspicions))):
        is_failed = index in failed
        rows.append({
            "slide_id": slide_id, "tile_index": index, "level": 0, "x": index * 100, "y": 0, "width": 100, "height": 100,
            "core_x0": index * 100, "core_y0": 0, "core_x1": index * 100 + 100, "core_y1": 100,
            "tissue_fraction": 0.5, "status": "failed" if is_failed else "ok", "error": "read failed: boom" if is_failed else "",
            "nuclei_owned": 0 if is_failed else 2, "suspicion": None if is_failed else suspicion,
            "nc_ratios": [] if is_failed else [0.1 * (index + 1), 0.2 * (index + 1)], "slide_info": "", "thumbnail": b"",
        })
    return pa.Table.from_pylist(rows, schema=STAGE_SCHEMA)


INFO = {"status": "ok", "error": "", "width": 300, "height": 100, "slide_mpp": 0.5, "slide_mpp_source": "metadata",
        "model_mpp": 1.0, "level": 0, "level_downsample": 1.0, "tiles_seen": 5, "tiles_kept": 3}


def test_summary_statistics():
    tiles = tile_table(_stage_rows(), "demo-student", "v1")
    assert tiles["tile_index"].to_pylist() == [0, 1, 2]
    summary = slide_summary("s1", "/x/s1.svs", INFO, tiles, 2, "demo-student", "v1").to_pylist()[0]
    ratios = [0.1, 0.2, 0.2, 0.4, 0.3, 0.6]
    assert summary["status"] == "ok"
    assert summary["tiles_seen"] == 5
    assert summary["tiles_scored"] == 3
    assert summary["tiles_skipped_background"] == 2
    assert summary["tiles_failed"] == 0
    assert summary["nuclei_counted"] == 6
    assert summary["cells_measured"] == 6
    assert summary["nc_ratio_mean"] == pytest.approx(np.mean(ratios))
    assert summary["nc_ratio_median"] == pytest.approx(np.median(ratios))
    assert summary["nc_ratio_p90"] == pytest.approx(np.percentile(ratios, 90))
    assert summary["nc_ratio_max"] == pytest.approx(0.6)
    # Top 2 tiles by suspicion: 0.9 (tile 1) and 0.5 (tile 2); the slide score is their mean.
    assert [tile["tile_index"] for tile in summary["top_tiles"]] == [1, 2]
    assert summary["slide_score"] == pytest.approx(0.7)


def test_summary_partial_and_failed():
    partial = tile_table(_stage_rows(failed=(0,)), "m", "v")
    row = slide_summary("s1", "u", INFO, partial, 10, "m", "v").to_pylist()[0]
    assert row["status"] == "partial"
    assert row["tiles_failed"] == 1
    assert "1 tiles failed" in row["error"]
    assert "boom" in row["error"]
    broken = tile_table(_stage_rows(failed=(0, 1, 2)), "m", "v")
    assert slide_summary("s1", "u", INFO, broken, 10, "m", "v")["status"][0].as_py() == "failed"
    unopened = slide_summary("s1", "u", {"status": "failed", "error": "SlideError: bad"}, tile_table(STAGE_SCHEMA.empty_table(), "m", "v"), 10, "m", "v")
    assert unopened["status"][0].as_py() == "failed"
    assert unopened["error"][0].as_py() == "SlideError: bad"
    assert np.isnan(unopened["slide_score"][0].as_py())


def test_commit_layout_and_resume_state(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    tiles = tile_table(_stage_rows(), "m", "v")
    summary = slide_summary("s1", "u", INFO, tiles, 10, "m", "v")
    store.commit_slide("s1", tiles, summary, b"png")
    files = sorted(str(path.relative_to(tmp_path / "out")) for path in (tmp_path / "out").rglob("*") if path.is_file())
    assert files == ["heatmaps/s1.png", "slides/s1.parquet", "tiles/s1.parquet"]
    assert store.completed() == {"s1": CommittedSlide("ok", "u")}
    assert pd.read_parquet(tmp_path / "out" / "tiles").shape[0] == 3


def test_rerun_warns_of_replaced_source(caplog):
    slides = [SlideSource("a", "/archive/a.svs", "a"), SlideSource("b", "/moved/b.svs", "b"),
              SlideSource("c", "/moved/c.svs", "c")]
    committed = {
        "a": CommittedSlide("ok", "/archive/a.svs"),
        "b": CommittedSlide("ok", "/archive/b.svs"),
        "c": CommittedSlide("failed", "/archive/c.svs"),  # scored again anyway
    }

    with caplog.at_level("WARNING", logger="cervi_ray.scoring.pipeline"):
        warn_changed_sources(slides, committed)

    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1
    assert "scored from another file than the one listed now" in warnings[0]
    assert "kept: b (1 in all)" in warnings[0]


def test_unreadable_summary_counts_as_incomplete(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    tiles = tile_table(_stage_rows(), "m", "v")
    store.commit_slide("s1", tiles, slide_summary("s1", "u", INFO, tiles, 10, "m", "v"), None)
    (tmp_path / "out" / "slides" / "s2.parquet").write_bytes(b"not parquet")
    assert store.completed() == {"s1": CommittedSlide("ok", "u")}


def test_commit_rejects_unsafe_id(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    tiles = tile_table(_stage_rows(), "m", "v")
    with pytest.raises(ValueError, match="not a safe file name"):
        store.commit_slide("../escape", tiles, slide_summary("x", "u", INFO, tiles, 1, "m", "v"), None)
    assert not (tmp_path / "escape.parquet").exists()
    assert not list((tmp_path / "out").rglob("*.parquet"))


def test_check_run_rejects_changed_settings(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    store.check_run({"tile_size": 512, "model_name": "a"})
    store.check_run({"tile_size": 512, "model_name": "a"})  # same settings: accepted
    with pytest.raises(ValueError, match=r"tile_size 512 \(now 256\)"):
        store.check_run({"tile_size": 256, "model_name": "a"})
    assert json.loads((tmp_path / "out" / "run.json").read_text())["tile_size"] == 512


def test_heatmap_colours_tiles():
    buffer = io.BytesIO()
    Image.new("RGB", (30, 10), (255, 255, 255)).save(buffer, format="JPEG")
    png = render_heatmap(buffer.getvalue(), INFO, _stage_rows(failed=(2,)))
    with Image.open(io.BytesIO(png)) as image:
        pixels = np.asarray(image)
    assert pixels.shape == (10, 30, 3)
    # Tile 1 (suspicion 0.9) is brighter yellow than tile 0 (0.2); failed tile 2 is grey.
    assert pixels[5, 15, 1] > pixels[5, 5, 1]
    assert abs(int(pixels[5, 25, 0]) - int(pixels[5, 25, 2])) < 8
    assert render_heatmap(b"", INFO, _stage_rows()) is None


def test_outputs_stay_in_prefix(tmp_path):
    out = tmp_path / "deep" / "out"
    store = OutputStore(str(out))
    for name in HOSTILE_NAMES:
        slide_id = safe_slide_id(name)
        tiles = tile_table(_stage_rows(slide_id), "m", "v")
        store.commit_slide(slide_id, tiles, slide_summary(slide_id, "u", INFO, tiles, 1, "m", "v"), b"png")
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert written
    assert all(Path(out) in path.parents for path in written)
