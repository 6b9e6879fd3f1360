"""The `score` command: options that override the scoring section, then one scoring run."""

import argparse
import logging

from cervi_ray.config import Config

logger = logging.getLogger(__name__)

# Command-line option -> scoring field it overrides.
OVERRIDES = {
    "input": "input",
    "manifest": "manifest",
    "checkpoint": "checkpoint",
    "output": "output",
    "endpoint_url": "endpoint_url",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the score command's options; each one overrides the scoring field of the same name."""
    parser.add_argument("--input", help="folder or s3://bucket/prefix of slides (else scoring.input)")
    parser.add_argument(
        "--manifest",
        help="CSV with a 'path' column (and optionally 'slide_id') or a text file of paths, one per line; "
        "relative paths are resolved against --input (else scoring.manifest)",
    )
    parser.add_argument("--checkpoint", help="model checkpoint folder or s3:// URI (else scoring.checkpoint)")
    parser.add_argument("--output", help="folder or s3://bucket/prefix for the results (else scoring.output)")
    parser.add_argument("--endpoint-url", dest="endpoint_url", help="S3-compatible endpoint, e.g. http://127.0.0.1:9000")


def run(config: Config, args: argparse.Namespace) -> None:
    """Apply the options to config.scoring and score the archive."""
    from cervi_ray.scoring.pipeline import score_archive

    for option, name in OVERRIDES.items():
        value = getattr(args, option, None)
        if value is not None:
            setattr(config.scoring, name, value)
    report = score_archive(config)
    print(
        f"slides: {report.slides_listed} listed, {report.slides_already_done} already complete, "
        f"this run {dict(report.statuses) or 'none'}; {report.tiles_scored} tiles scored in {report.seconds:.1f} s"
    )
    print(f"results: {report.output}/tiles, {report.output}/slides, {report.output}/heatmaps")
