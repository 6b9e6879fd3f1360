"""The end-to-end run: data, teacher training, distillation, evaluation and report.

Each phase is also its own CLI command and job; this module chains them for the demo.
"""

import json
import logging
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.fs as pafs
import ray.train
import torch

from cervi_ray.checkpoint import MODEL_FILE, code_version, load_model
from cervi_ray.config import Config, save_config
from cervi_ray.data.manifest import build_manifest, write_manifest
from cervi_ray.data.splits import assign_split, load_or_create_splits
from cervi_ray.evaluation import all_nucleus_predictor, evaluate_rows, multi_otsu_predictor
from cervi_ray.metrics import to_jsonable
from cervi_ray.report.curves import plot_training_curves
from cervi_ray.report.markdown import write_report
from cervi_ray.storage import resolve_storage, storage_retry_policy
from cervi_ray.train.evaluate import evaluate_checkpoints, group_rows_by_source
from cervi_ray.tracking import log_pipeline_outputs, pipeline_tracker
from cervi_ray.train.trainer import TrainingOutcome, ensure_ray, fit, standard_job

logger = logging.getLogger(__name__)

DATA_CITATION = (
    "Data: ISBI 2014 and ISBI 2015 Overlapping Cervical Cytology Image Segmentation "
    "Challenges (Lu, Carneiro, Bradley et al., IEEE Trans. Image Processing 24(4), 2015; "
    "Lu et al., IEEE J. Biomedical and Health Informatics 21(2), 2017)."
)


def prepare_data(config: Config) -> pd.DataFrame:
    """Build the manifest, create or reuse the splits file, and assign each row its split."""
    root = config.data_root()
    sources = [source.model_dump() for source in config.data.sources]
    manifest = build_manifest(sources, root)
    split = config.data.split
    splits = load_or_create_splits(
        config.splits_file, manifest, seed=split.seed, test_fraction=split.test_fraction, folds=split.folds
    )
    manifest = assign_split(manifest, splits, fold=split.fold)
    config.run_dir.mkdir(parents=True, exist_ok=True)
    write_manifest(manifest, config.run_dir / "manifest.parquet")
    save_config(config, config.run_dir / "config.yaml")
    logger.info(
        "data: %d images from %d sources, splits file %s, fold %d",
        len(manifest), len(sources), config.splits_file, split.fold,
    )
    return manifest


def split_counts(manifest: pd.DataFrame) -> dict[str, dict[str, int]]:
    table = manifest.groupby(["source", "split"]).size()
    counts: dict[str, dict[str, int]] = {}
    for (source, split), count in table.items():
        counts.setdefault(source, {})[split] = int(count)
    return counts


def training_summary(outcome: TrainingOutcome, seconds: float) -> dict[str, Any]:
    validated = [entry for entry in outcome.history if "val_dice" in entry]
    last = validated[-1] if validated else {}
    return {
        "epochs_run": outcome.history[-1]["epoch"] if outcome.history else 0,
        "best_epoch": outcome.best_metrics.get("epoch"),
        "best_val_dice": outcome.best_metrics.get("val_dice"),
        "stopped_by": last.get("stopped") or "epoch limit",
        "seconds": seconds,
        "best_checkpoint": outcome.best_checkpoint.path,
    }


def checkpoint_from_uri(uri: str, endpoint_url: str | None = None) -> ray.train.Checkpoint:
    """A Ray checkpoint for a local folder or s3:// URI; Ray tasks fetch it where they run."""
    path, filesystem = resolve_storage(uri, endpoint_url)
    if filesystem is None and not Path(path).is_dir():
        raise FileNotFoundError(f"checkpoint folder {path} not found")
    return ray.train.Checkpoint(path, filesystem=filesystem)


def loadable_checkpoint(uri: str, endpoint_url: str | None = None) -> ray.train.Checkpoint:
    """Return checkpoint_from_uri(uri) after loading its model once on the driver.

    A missing, damaged or pickled checkpoint then fails with its error before Ray Train starts
    workers (which would each fail and be retried). An s3:// checkpoint is downloaded for this.
    """
    checkpoint = checkpoint_from_uri(uri, endpoint_url)
    with checkpoint.as_directory() as folder:
        load_model(folder)
    return checkpoint


def best_checkpoint_of_run(config: Config, label: str) -> ray.train.Checkpoint | None:
    """Best checkpoint (highest validation Dice) of the finished run `<run.name>-<label>`.

    Reads the checkpoint folders in storage directly, so no trainer has to start. A folder
    without both meta.json and the weights (an upload cut short by a lost node) is skipped.
    Returns None when the run has no checkpoint.
    """
    root, filesystem = resolve_storage(
        config.storage_path, config.run.storage_endpoint_url, storage_retry_policy(config.run)
    )
    filesystem = filesystem or pafs.LocalFileSystem()
    run_path = f"{root.rstrip('/')}/{config.run.name}-{label}"
    selector = pafs.FileSelector(run_path, allow_not_found=True)
    best, best_dice = None, float("-inf")
    for info in filesystem.get_file_info(selector):
        if info.type != pafs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        try:
            with filesystem.open_input_stream(f"{info.path}/meta.json") as stream:
                meta = json.loads(stream.read())
        except (OSError, json.JSONDecodeError):
            logger.warning("skipping %s: unreadable meta.json", info.path)
            continue
        if filesystem.get_file_info(f"{info.path}/{MODEL_FILE}").type != pafs.FileType.File:
            logger.warning("skipping %s: no %s", info.path, MODEL_FILE)
            continue
        dice = meta.get("metrics", {}).get("val_dice", float("-inf"))
        if dice > best_dice:
            best, best_dice = info.path, dice
    return None if best is None else ray.train.Checkpoint(best, filesystem=filesystem)


def run_baselines(eval_sets: dict[str, list[dict]], n_boot: int) -> dict[str, dict]:
    """Classical and trivial baselines on the same evaluation sets, at native resolution."""
    results: dict[str, dict] = {}
    for name, predictor in (("multi-Otsu", multi_otsu_predictor), ("all-nucleus", all_nucleus_predictor)):
        results[name] = {
            set_name: to_jsonable(evaluate_rows(predictor, rows, 1.0, n_boot, None, 0))
            for set_name, rows in eval_sets.items()
        }
    return results


def run_pipeline(config: Config) -> Path:
    """Train the teacher, distil the student, evaluate both and write the report. Returns its path.

    With config.tracking on, the demo is an MLflow parent run: both training runs nest under it,
    and the report, curves, summary and evaluation metrics are its artifacts.
    """
    with pipeline_tracker(config) as tracker:
        report = _run_phases(config, tracker.run_id)
        log_pipeline_outputs(tracker, config.run_dir)
    return report


def _run_phases(config: Config, tracking_parent_run_id: str | None) -> Path:
    started = time.monotonic()
    run_dir = config.run_dir

    logger.info("[1/5] preparing data in %s", run_dir)
    manifest = prepare_data(config)
    rows = manifest.to_dict(orient="records")
    ensure_ray(config.ray)

    logger.info("[2/5] training the teacher (%s)", config.model.teacher.encoder)
    phase = time.monotonic()
    jobs = {
        task: standard_job(config, task).model_copy(update={"tracking_parent_run_id": tracking_parent_run_id})
        for task in ("teacher", "student")
    }
    teacher = fit(config, jobs["teacher"], rows)
    training = {"teacher": training_summary(teacher, time.monotonic() - phase)}
    logger.info("teacher done: best val_dice %.4f", teacher.best_metrics.get("val_dice", float("nan")))

    logger.info("[3/5] distilling the student")
    phase = time.monotonic()
    student = fit(config, jobs["student"], rows, teacher_checkpoint=teacher.best_checkpoint)
    training["student"] = training_summary(student, time.monotonic() - phase)
    logger.info("student done: best val_dice %.4f", student.best_metrics.get("val_dice", float("nan")))

    logger.info("[4/5] evaluating on the %s split", config.eval.split)
    eval_sets = group_rows_by_source(rows, config.eval.split)
    results = evaluate_checkpoints(
        {"teacher": teacher.best_checkpoint, "student": student.best_checkpoint},
        eval_sets, run_dir / "eval", config.eval.n_boot, config.eval.overlays,
        config.eval.latency_runs, cpus_per_task=config.scaling.cpus_per_worker,
    )
    baselines = run_baselines(eval_sets, config.eval.n_boot)
    (run_dir / "eval" / "baselines.json").write_text(json.dumps(baselines, indent=2))

    logger.info("[5/5] writing the report")
    report = write_run_report(config, manifest, training, {"teacher": teacher, "student": student}, results, baselines)
    logger.info("done in %.0f s: %s", time.monotonic() - started, report)
    return report


def write_run_report(config, manifest, training, outcomes, results, baselines) -> Path:
    run_dir = config.run_dir
    curves = {
        task: plot_training_curves(outcome.history, run_dir / f"curves_{task}.png", f"{task} training")
        for task, outcome in outcomes.items()
    }
    models = {}
    for name, result in results.items():
        info = dict(result["complexity"])
        seconds = [entry["seconds_per_image"] for entry in result["sets"].values()]
        info["seconds_per_eval_image"] = sum(seconds) / len(seconds) if seconds else None
        models[name] = info
    per_model = {name: result["sets"] for name, result in results.items()}
    per_model.update(baselines)
    overlays = {
        name: {
            set_name: sorted((run_dir / "eval" / name / "overlays" / set_name).glob("*.png"))
            for set_name in result["sets"]
        }
        for name, result in results.items()
    }
    facts = {
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "code version": code_version(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "workers": f"{config.scaling.num_workers} x {config.scaling.cpus_per_worker} CPU"
                   + (" + GPU" if config.scaling.use_gpu else ""),
        "image scale": f"{config.data.scale} (crops {config.data.crop_size})",
        "splits file": str(config.splits_file),
        "config": str(run_dir / "config.yaml"),
    }
    context = {
        "title": f"cervi_ray run report: {config.run.name}",
        "facts": facts,
        "split_counts": split_counts(manifest),
        "training": training,
        "models": models,
        "results": per_model,
        "curves": curves,
        "overlays": overlays,
        "speed_note": (
            "Seconds per image: median CPU forward pass at the nominal input side, one thread per "
            "evaluation task; seconds per evaluation image includes upsampling to native "
            "resolution. Measured on the machine above, not comparable with GPU figures."
        ),
        "citation": DATA_CITATION,
    }
    (run_dir / "summary.json").write_text(json.dumps(
        {"training": training, "models": models, "results": per_model}, indent=2, default=str
    ))
    return write_report(run_dir / "report.md", context)


def evaluate_checkpoint_uri(config: Config, checkpoint_uri: str, output_dir: Path) -> dict[str, Any]:
    """Evaluate one checkpoint (folder or s3:// URI) on the configured split; the evaluate job."""
    manifest = prepare_data(config)
    rows = manifest.to_dict(orient="records")
    ensure_ray(config.ray)
    checkpoint = checkpoint_from_uri(checkpoint_uri, config.run.storage_endpoint_url)
    eval_sets = group_rows_by_source(rows, config.eval.split)
    results = evaluate_checkpoints(
        {"model": checkpoint}, eval_sets, output_dir, config.eval.n_boot, config.eval.overlays,
        config.eval.latency_runs, cpus_per_task=config.scaling.cpus_per_worker,
    )
    return results["model"]
