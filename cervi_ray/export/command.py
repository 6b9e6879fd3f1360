"""The `export` command: build a self-describing model bundle from a checkpoint."""

from __future__ import annotations

import argparse
import logging

from cervi_ray.config import Config
from cervi_ray.export.bundle import METRICS_SPLITS, build_bundle_from_uri
from cervi_ray.tta import ALL_TRANSFORMS

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the export options to the `export` subcommand's parser."""
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder or s3:// URI to export")
    parser.add_argument(
        "--output", required=True,
        help="bundle folder to create, which must be missing or empty unless --force is given",
    )
    parser.add_argument(
        "--metrics",
        help="metrics.json written by `cervi-ray evaluate` for this checkpoint (or its folder), "
        "recorded as the bundle's held-out metrics",
    )
    parser.add_argument(
        "--metrics-split", choices=METRICS_SPLITS, default="test",
        help="split that --metrics was computed on (default test)",
    )
    parser.add_argument("--no-onnx", action="store_true", help="write no ONNX files")
    parser.add_argument("--no-tta-onnx", action="store_true", help="write model.onnx but not model_tta.onnx")
    parser.add_argument(
        "--tta", nargs="+", choices=ALL_TRANSFORMS, metavar="VIEW",
        help=f"TTA views of model_tta.onnx, from: {', '.join(ALL_TRANSFORMS)} (default: eval.tta "
        "of the checkpoint's config)",
    )
    parser.add_argument(
        "--onnx-size", type=int, metavar="PIXELS",
        help="side in pixels of the square example input traced for ONNX (default model.input_size "
        "of the checkpoint's config); the graphs accept other sizes too",
    )
    parser.add_argument("--archive", action="store_true", help="also write <output>.tar.gz")
    parser.add_argument("--force", action="store_true", help="replace an existing bundle folder and archive")


def run(config: Config, args: argparse.Namespace) -> None:
    """Build the bundle and print its folder, files and ONNX checks.

    `config` supplies only run.storage_endpoint_url for s3:// checkpoints. The model's own
    config comes from the checkpoint.
    """
    try:
        result = build_bundle_from_uri(
            args.checkpoint,
            args.output,
            endpoint_url=config.run.storage_endpoint_url,
            metrics=args.metrics,
            metrics_split=args.metrics_split,
            onnx=not args.no_onnx,
            tta=args.tta,
            tta_onnx=not args.no_tta_onnx,
            onnx_size=args.onnx_size,
            archive=args.archive,
            force=args.force,
        )
    except FileExistsError as e:
        # The command line prints ValueError as a one-line error, which suits an existing output.
        raise ValueError(str(e)) from None

    print(f"bundle: {result.folder}")
    for name, record in result.files.items():
        print(f"  {name}  {record['bytes']} bytes  sha256 {record['sha256']}")
    if result.onnx is not None:
        print(f"ONNX exporter: {result.onnx['exporter']}, opset {result.onnx['opset_version']}")
        for name, record in result.onnx["files"].items():
            check = record["check"]
            print(
                f"  {name}: max abs difference of {record['output']} vs PyTorch {check['max_abs_diff']:.3g} "
                f"(allowed {check['max_abs_diff_allowed']:.3g}), same argmax on "
                f"{100 * check['argmax_agreement']:.3f} % of pixels"
            )
    if result.archive is not None:
        print(f"archive: {result.archive}")
