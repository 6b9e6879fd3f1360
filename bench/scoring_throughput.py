"""Tiles per second of the Ray Data scoring job against a bare single-process PyTorch loop.

    python bench/scoring_throughput.py [--config configs/demo.yaml] [--slide SLIDE] [--checkpoint FOLDER]
                                       [--threads 2] [--set section.key=value ...]

Scores one slide with the scoring section of the config (TTA views, batch size, actors). The
Ray Data job runs twice: a cold run that starts Ray workers and loads the model, then a warm
run on a new output prefix. Then a plain loop in this process scores the same tiles with the
same model and the same TTA views. Without --checkpoint it saves the profile's student
with random weights, which costs the same time as trained ones. The loop is timed twice: model
and TTA alone, and reading plus model plus per-tile statistics, the work one Ray tile row gets.
"""

import argparse
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cervi_ray.checkpoint import describe_model, load_model, save_checkpoint
from cervi_ray.config import load_config
from cervi_ray.data.dataset import to_tensor
from cervi_ray.models import build_student
from cervi_ray.scoring.pipeline import score_archive
from cervi_ray.scoring.resolution import model_resolution
from cervi_ray.scoring.slides import SlideStorage
from cervi_ray.scoring.stages import HEADER_INDEX, StageSettings, plan_slide, read_tiles, summarise_tiles
from cervi_ray.tta import predict_with_tta

DEFAULT_SLIDE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wsi" / "cmu-1-small-region.svs"


def bare_loop(checkpoint: Path, settings: StageSettings, slide: Path, tta: list[str], batch_size: int, threads: int) -> dict:
    """Score the slide's kept tiles in this process; return tile count and both timings."""
    torch.set_num_threads(threads)
    model, _ = load_model(checkpoint)
    rows = [row for row in plan_slide({"slide_id": "bench", "uri": str(slide)}, settings) if row["tile_index"] != HEADER_INDEX]
    tiles_per_forward = max(1, batch_size // len(tta))

    def batches():
        for start in range(0, len(rows), tiles_per_forward):
            chunk = rows[start : start + tiles_per_forward]
            columns = {key: np.asarray([row[key] for row in chunk], dtype=object if isinstance(chunk[0][key], (str, bytes)) else None)
                       for key in chunk[0]}
            yield columns

    # Reading plus model plus statistics: the work of one tile row in the Ray job.
    started = time.perf_counter()
    images = []
    for columns in batches():
        batch = read_tiles(columns, settings)
        images.append(batch["image"])
        inputs = torch.stack([to_tensor(np.ascontiguousarray(image)) for image in batch["image"]])  # (N, 3, T, T)
        with torch.no_grad():
            result = predict_with_tta(model, inputs, tta, max_batch=batch_size)
        batch["labels"] = result.labels.to(torch.uint8).numpy()
        batch["disagreement_votes"] = torch.round(result.disagreement * len(tta)).to(torch.uint8).numpy()
        summarise_tiles(batch, settings)
    full_seconds = time.perf_counter() - started

    # Model and TTA alone, on the tiles read above.
    started = time.perf_counter()
    for chunk in images:
        inputs = torch.stack([to_tensor(np.ascontiguousarray(image)) for image in chunk])
        with torch.no_grad():
            predict_with_tta(model, inputs, tta, max_batch=batch_size)
    model_seconds = time.perf_counter() - started
    return {"tiles": len(rows), "full_seconds": full_seconds, "model_seconds": model_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--slide", default=str(DEFAULT_SLIDE), help="slide file to score")
    parser.add_argument("--checkpoint", help="checkpoint folder (default: the profile's untrained student)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads of the bare loop")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override a config value, e.g. --set scoring.cpus_per_actor=2 (repeatable)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    work = Path(tempfile.mkdtemp(prefix="cervi_ray_bench_"))
    try:
        config = load_config(args.config, args.overrides)
        scoring = config.scoring
        checkpoint = Path(args.checkpoint) if args.checkpoint else work / "checkpoint"
        if not args.checkpoint:
            torch.manual_seed(0)
            save_checkpoint(checkpoint, build_student(config.model, config.data.num_classes), describe_model(config, "student"))
        slides = work / "slides"
        slides.mkdir()
        shutil.copy(args.slide, slides / Path(args.slide).name)
        _, meta = load_model(checkpoint)

        print(f"{args.config}: {Path(args.slide).name}, tile {scoring.tile_size} overlap {scoring.overlap}, "
              f"TTA {scoring.tta}, batch_size {scoring.batch_size}, {scoring.inference_actors} actor(s) x "
              f"{scoring.cpus_per_actor:g} CPU, ray.num_cpus {config.ray.num_cpus}; {os.cpu_count()} cores "
              f"{platform.machine()}, torch {torch.__version__}")
        results = {}
        for run in ("ray_cold", "ray_warm"):
            scoring.input, scoring.checkpoint, scoring.output = str(slides), str(checkpoint), str(work / run)
            report = score_archive(config)
            results[run] = {"tiles": report.tiles_scored, "seconds": report.seconds}

        settings = StageSettings(
            tile_size=scoring.tile_size, overlap=scoring.overlap, min_tissue_fraction=scoring.min_tissue_fraction,
            model_mpp=model_resolution(meta, scoring.model_mpp).mpp, slide_mpp=scoring.slide_mpp,
            thumbnail_size=scoring.thumbnail_size, storage=SlideStorage(), views=len(scoring.tta),
            has_cytoplasm=meta.get("label_mode", "full") == "full", write_masks=scoring.write_masks,
        )
        bare = bare_loop(checkpoint, settings, Path(args.slide), list(scoring.tta), scoring.batch_size, args.threads)

        print("| run | tiles | seconds | tiles per second |")
        print("| --- | --- | --- | --- |")
        for label, key in (("Ray Data job, cold (starts workers, loads the model)", "ray_cold"),
                           ("Ray Data job, warm (second run, new output)", "ray_warm")):
            tiles, seconds = results[key]["tiles"], results[key]["seconds"]
            print(f"| {label} | {tiles} | {seconds:.1f} | {tiles / seconds:.2f} |")
        for label, key in ((f"bare loop, read + model + statistics ({args.threads} threads)", "full_seconds"),
                           (f"bare loop, model + TTA only ({args.threads} threads)", "model_seconds")):
            print(f"| {label} | {bare['tiles']} | {bare[key]:.1f} | {bare['tiles'] / bare[key]:.2f} |")
        print(json.dumps({"ray": results, "bare": bare}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
