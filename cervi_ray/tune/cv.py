"""k-fold cross-validation as a Ray Tune sweep: one trial per fold and parameter combination.

Each trial trains in its own process (one worker, the shared engine) on its fold of the
persisted splits file and reports validation metrics every epoch. Running the same sweep again
restores it from storage: finished folds are kept, errored and unfinished ones resume from
their latest checkpoint.
"""

import itertools
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
import ray.tune
import torch
from ray.tune import CheckpointConfig, FailureConfig, RunConfig, TuneConfig, Tuner

from cervi_ray.config import Config, config_from_dict
from cervi_ray.data.splits import assign_split
from cervi_ray.storage import resolve_storage, storage_retry_policy
from cervi_ray.tracking import sweep_tracker
from cervi_ray.train.engine import TrainingJob, run_training
from cervi_ray.tune.session import TuneSession

logger = logging.getLogger(__name__)

FOLD_METRICS = ("val_dice", "val_dice_cytoplasm", "val_dice_nucleus", "val_dice_cell")


def sweep_name(config: Config, sweep: str) -> str:
    return f"{config.run.name}-cv-{sweep}"


def expand_grid(param_grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Expand a {"section.key": [values]} grid into all combinations ([{}] for an empty grid)."""
    for key, values in param_grid.items():
        if "." not in key or not isinstance(values, list) or not values:
            raise ValueError(f"cv.param_grid entry {key!r} must map section.key to a non-empty list, got {values!r}")
    keys = sorted(param_grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(param_grid[k] for k in keys))]


def apply_params(config_tree: dict[str, Any], params: dict[str, Any]) -> Config:
    tree = json.loads(json.dumps(config_tree))
    for key, value in params.items():
        *sections, name = key.split(".")
        node = tree
        for part in sections:
            node = node.setdefault(part, {})
        node[name] = value
    return config_from_dict(tree, origin=f"config with cv parameters {params}")


def fold_job(config: Config) -> TrainingJob:
    task = config.cv.task
    if task == "teacher":
        return TrainingJob(label="teacher", model_kind="teacher", optim=config.teacher_train)
    if task in ("student", "distill"):
        return TrainingJob(label=task, model_kind="student", distill=task == "distill", optim=config.student_train)
    return TrainingJob(label=task, model_kind=task, optim=config.teacher_train)


def fold_rows(records: list[dict], splits: dict, fold: int, sources: list[str] | None) -> list[dict]:
    """Training and validation rows of one fold, limited to `sources` when given.

    Rows may carry another fold's split already. Every row that the splits file covers is
    reassigned, and rows of pinned sources keep theirs because the file does not list them.
    """
    manifest = pd.DataFrame.from_records(records)
    split_ids = set(splits["test"]) | set(splits["folds"][0]["train"]) | set(splits["folds"][0]["val"])
    manifest["split"] = ["" if sample_id in split_ids else split for sample_id, split in zip(manifest["id"], manifest["split"])]
    rows = assign_split(manifest, splits, fold=fold).to_dict(orient="records")
    return [
        row for row in rows
        if row["split"] in ("train", "val") and (sources is None or row["source"] in sources)
    ]


def fold_trainable(trial: dict[str, Any], config_tree: dict, records: list[dict], splits: dict,
                   teacher_checkpoints: dict[int, Any], tracking_parent_run_id: str | None = None) -> None:
    """Train one fold inside a Tune trial; its MLflow run nests under `tracking_parent_run_id`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = apply_params(config_tree, trial["params"])
    fold = trial["fold"]
    torch.set_num_threads(config.cv.cpus_per_trial)
    rows = fold_rows(records, splits, fold, config.cv.sources)
    job = fold_job(config).model_copy(
        update={"label": f"{config.cv.task} fold {fold}", "tracking_parent_run_id": tracking_parent_run_id}
    )
    session = TuneSession(use_gpu=config.cv.gpus_per_trial > 0)
    if not job.distill:
        run_training(config, job, rows, session)
        return
    with teacher_checkpoints[fold].as_directory() as teacher_dir:
        run_training(config, job, rows, session, teacher_dir=Path(teacher_dir))


def _teacher_checkpoints(config: Config, folds: list[int]) -> dict[int, Any]:
    """Best checkpoint per fold of the teacher sweep named in cv.teacher_sweep."""
    if config.cv.teacher_sweep is None:
        raise ValueError("cv.task 'distill' needs cv.teacher_sweep: the name of a finished teacher sweep")
    grid = restore_results(config, config.cv.teacher_sweep)
    checkpoints = {}
    for result in grid:
        fold = result.config["fold"]
        if result.error is None and fold in folds:
            checkpoints[fold] = result.get_best_checkpoint("val_dice", "max")
    missing = sorted(set(folds) - set(checkpoints))
    if missing:
        raise ValueError(f"teacher sweep {config.cv.teacher_sweep!r} has no finished trial for folds {missing}")
    return checkpoints


def _storage(config: Config) -> tuple[str, Any]:
    return resolve_storage(config.storage_path, config.run.storage_endpoint_url, storage_retry_policy(config.run))


def restore_results(config: Config, sweep: str) -> ray.tune.ResultGrid:
    path, filesystem = _storage(config)
    experiment = f"{path.rstrip('/')}/{sweep_name(config, sweep)}"
    if not Tuner.can_restore(experiment, storage_filesystem=filesystem):
        raise FileNotFoundError(f"no cross-validation sweep at {experiment}")
    return Tuner.restore(experiment, trainable=fold_trainable, storage_filesystem=filesystem).get_results()


def run_cv(config: Config, records: list[dict], splits: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run (or restore and finish) the sweep; returns the per-fold table and the summary."""
    folds = config.cv.folds if config.cv.folds is not None else list(range(config.data.split.folds))
    bad = [fold for fold in folds if not 0 <= fold < config.data.split.folds]
    if bad:
        raise ValueError(f"cv.folds {bad} outside 0..{config.data.split.folds - 1} (data.split.folds)")
    teachers = _teacher_checkpoints(config, folds) if config.cv.task == "distill" else {}
    tracker = sweep_tracker(config, sweep_name(config, config.cv.name), "cv")

    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(
            fold_trainable, config_tree=config.model_dump(mode="json"), records=records,
            splits=splits, teacher_checkpoints=teachers, tracking_parent_run_id=tracker.run_id,
        ),
        {"cpu": config.cv.cpus_per_trial, "gpu": config.cv.gpus_per_trial},
    )

    # A sweep already in storage is restored: finished trials stay, the rest resume.
    path, filesystem = _storage(config)
    experiment = f"{path.rstrip('/')}/{sweep_name(config, config.cv.name)}"
    if Tuner.can_restore(experiment, storage_filesystem=filesystem):
        logger.info("restoring sweep %s: finished folds are kept", experiment)
        tuner = Tuner.restore(
            experiment, trainable=trainable, resume_unfinished=True, resume_errored=True,
            storage_filesystem=filesystem,
        )
    else:
        tuner = Tuner(
            trainable,
            param_space={
                "fold": ray.tune.grid_search(folds),
                "params": ray.tune.grid_search(expand_grid(config.cv.param_grid)),
            },
            tune_config=TuneConfig(max_concurrent_trials=config.cv.max_concurrent_trials),
            run_config=RunConfig(
                name=sweep_name(config, config.cv.name),
                storage_path=path,
                storage_filesystem=filesystem,
                failure_config=FailureConfig(max_failures=config.cv.max_failures),
                checkpoint_config=CheckpointConfig(
                    num_to_keep=2, checkpoint_score_attribute="val_dice", checkpoint_score_order="max"
                ),
            ),
        )

    with tracker:
        grid = tuner.fit()
        table = fold_table(grid)
        summary = summarize(table)
        tracker.log_text(markdown_tables(table, summary), "cv.md")
    return table, summary


def fold_table(grid: ray.tune.ResultGrid) -> pd.DataFrame:
    """Tabulate each trial: fold, parameters, status and the metrics of its best validation epoch."""
    rows = []
    for result in grid:
        row: dict[str, Any] = {
            "fold": result.config["fold"],
            "params": json.dumps(result.config["params"], sort_keys=True),
            "status": "error" if result.error is not None else "ok",
            "error": "" if result.error is None else str(result.error).splitlines()[0][:300],
        }
        history = result.metrics_dataframe
        if history is not None and "val_dice" in history:
            validated = history.dropna(subset=["val_dice"])
            if len(validated):
                best = validated.loc[validated["val_dice"].idxmax()]
                row["best_epoch"] = int(best["epoch"])
                row["epochs_run"] = int(history["epoch"].max())
                row.update({name: float(best[name]) for name in FOLD_METRICS if name in best})
        checkpoint = result.get_best_checkpoint("val_dice", "max") if result.best_checkpoints else None
        row["checkpoint"] = "" if checkpoint is None else checkpoint.path
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["params", "fold"]).reset_index(drop=True)


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample standard deviation over folds, per parameter combination, best first."""
    rows = []
    for params, group in table.groupby("params"):
        done = group[group["status"] == "ok"]
        row: dict[str, Any] = {"params": params, "folds_ok": len(done), "folds_failed": len(group) - len(done)}
        for name in FOLD_METRICS:
            values = done[name].dropna().to_numpy() if name in done else np.array([])
            row[f"{name}_mean"] = float(values.mean()) if len(values) else float("nan")
            row[f"{name}_std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows).sort_values("val_dice_mean", ascending=False).reset_index(drop=True)


def markdown_tables(table: pd.DataFrame, summary: pd.DataFrame) -> str:
    lines = ["| fold | parameters | status | best epoch | " + " | ".join(FOLD_METRICS) + " |",
             "| --- " * (4 + len(FOLD_METRICS)) + "|"]
    for _, row in table.iterrows():
        values = " | ".join(_fmt(row.get(name)) for name in FOLD_METRICS)
        lines.append(f"| {row['fold']} | {row['params']} | {row['status']} | {_fmt(row.get('best_epoch'))} | {values} |")
    lines += ["", "| parameters | folds ok | " + " | ".join(f"{name} mean +- std" for name in FOLD_METRICS) + " |",
              "| --- " * (2 + len(FOLD_METRICS)) + "|"]
    for _, row in summary.iterrows():
        values = " | ".join(f"{_fmt(row[f'{n}_mean'])} +- {_fmt(row[f'{n}_std'])}" for n in FOLD_METRICS)
        lines.append(f"| {row['params']} | {row['folds_ok']} | {values} |")
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def write_cv_outputs(folder: Path, table: pd.DataFrame, summary: pd.DataFrame) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "folds": folder / "folds.parquet",
        "summary": folder / "summary.parquet",
        "markdown": folder / "cv.md",
        "best": folder / "best_params.json",
    }
    table.to_parquet(paths["folds"], index=False)
    summary.to_parquet(paths["summary"], index=False)
    paths["markdown"].write_text(markdown_tables(table, summary))
    best = json.loads(summary.iloc[0]["params"]) if len(summary) else {}
    paths["best"].write_text(json.dumps(best, indent=2))
    return paths
