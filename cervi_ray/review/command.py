"""The `review` command: QuPath GeoJSON and HTML pages for scored slides, or a run's HTML report.

    cervi-ray review --scores OUTPUT [--slide ID ...] [--out DIR] [--top-k K] [--all-tiles]
    cervi-ray review --run RUN_FOLDER [--out DIR]

For each slide, <out>/<slide_id>.geojson contains its nuclei, cells and review tiles for QuPath
(File > Import objects from file, or drag the file onto the open slide) and <out>/<slide_id>.html
is its review page. For a run folder, <out>/report.html is the run report.
"""

import argparse
import logging
from pathlib import Path

from cervi_ray.config import Config
from cervi_ray.review.geojson import slide_feature_collection, write_geojson
from cervi_ray.review.run_report import HTML_FILE, write_run_html
from cervi_ray.review.scored import MissingMasksError, list_scored_slides, load_scored_slide
from cervi_ray.review.slide_report import write_slide_html
from cervi_ray.scoring.slides import SlideStorage
from cervi_ray.storage import is_remote

logger = logging.getLogger(__name__)

REVIEW_DIR = "review"  # default output folder inside a local scoring output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the review command's options."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--scores", help="scoring output folder or s3://bucket/prefix (the score command's --output)")
    source.add_argument("--run", help="demo run folder that contains report.md; writes its HTML report")
    parser.add_argument(
        "--slide", dest="slides", action="append", metavar="ID",
        help="slide id to review, repeatable (default: every slide with a summary in --scores)",
    )
    parser.add_argument(
        "--out", help=f"folder for the written files (default: <scores>/{REVIEW_DIR} for a local --scores, "
        "the run folder for --run; required for an s3:// --scores)",
    )
    parser.add_argument(
        "--top-k", dest="top_k", type=int,
        help="number of top tiles in the GeoJSON and on the page (default: all top tiles the summary lists, "
        "scoring.top_k at scoring time)",
    )
    parser.add_argument(
        "--all-tiles", dest="all_tiles", action="store_true",
        help="put every scored tile in the GeoJSON instead of the top tiles",
    )
    parser.add_argument(
        "--endpoint-url", dest="endpoint_url",
        help="S3-compatible endpoint for --scores and the slides, e.g. http://127.0.0.1:9000 (else scoring.endpoint_url)",
    )


def review_run(run_dir: str, out: str | None) -> Path:
    """Write the HTML report of a demo run folder; returns its path."""
    return write_run_html(run_dir, Path(out) / HTML_FILE if out else None)


def review_slides(
    scores: str, slide_ids: list[str] | None, out: str | None, top_k: int | None, all_tiles: bool,
    storage: SlideStorage,
) -> list[Path]:
    """Write the GeoJSON and the HTML page of each slide; returns the written paths.

    Every slide's page is written first. Raises MissingMasksError afterwards, naming the slides,
    when some slides have no stored masks and so no GeoJSON.
    """
    if out is None:
        if is_remote(scores):
            raise ValueError(f"--out is required when --scores is an s3:// URI ({scores}); pass a local folder")
        out = str(Path(scores) / REVIEW_DIR)
    if top_k is not None and top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {top_k}")
    ids = slide_ids or list_scored_slides(scores, storage.endpoint_url)
    if not ids:
        raise FileNotFoundError(f"no slide summaries under {scores}/slides; check --scores (the score command's --output)")

    written: list[Path] = []
    missing_masks: list[str] = []
    for slide_id in ids:
        slide = load_scored_slide(scores, slide_id, storage.endpoint_url)
        written.append(write_slide_html(slide, Path(out) / f"{slide_id}.html", top_k, storage))
        try:
            collection = slide_feature_collection(slide, "all" if all_tiles else "top", top_k)
        except MissingMasksError as e:
            logger.error("slide %s: no GeoJSON: %s", slide_id, e)
            missing_masks.append(slide_id)
            continue
        written.append(write_geojson(collection, Path(out) / f"{slide_id}.geojson"))
        logger.info("slide %s: %d features, page and GeoJSON in %s", slide_id, len(collection["features"]), out)
    if missing_masks:
        raise MissingMasksError(
            f"no GeoJSON for {len(missing_masks)} slide(s) ({', '.join(missing_masks[:10])}): {scores} stores no "
            "label masks for them. Score them again with --set scoring.write_masks=true into a new --output; "
            f"their HTML pages are in {out}"
        )
    return written


def run(config: Config, args: argparse.Namespace) -> None:
    """Write the review files that the options ask for and print their paths."""
    if args.run:
        print(f"run report: {review_run(args.run, args.out)}")
        return
    scoring = config.scoring
    storage = SlideStorage(args.endpoint_url or scoring.endpoint_url, scoring.cache_dir, scoring.remote_access)
    for path in review_slides(args.scores, args.slides, args.out, args.top_k, args.all_tiles, storage):
        print(path)
