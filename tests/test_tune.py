"""Ray Tune sweeps on a local cluster: k-fold restore after a kill, pruning search, ablation."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from cervi_ray.checkpoint import describe_model, load_model, save_checkpoint
from cervi_ray.config import save_config
from cervi_ray.data.splits import read_splits
from cervi_ray.models import build_student
from cervi_ray.pipeline import checkpoint_from_uri, prepare_data
from cervi_ray.tune.cv import expand_grid, fold_rows, run_cv, summarize, sweep_name, write_cv_outputs
from cervi_ray.tune.prune import run_prune_search, select, write_prune_outputs
from overrides import with_overrides

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]


def _trial_states(experiment: Path) -> dict[str, str]:
    """Trial id -> status from Tune's newest experiment state file (empty before the first)."""
    states = sorted(experiment.glob("experiment_state-*.json"))
    if not states:
        return {}
    try:
        data = json.loads(states[-1].read_text())
    except json.JSONDecodeError:  # caught mid-write
        return {}
    trials = {}
    for entry in data.get("trial_data", []):
        trial = json.loads(entry[0]) if isinstance(entry, list) else entry
        trials[trial["trial_id"]] = trial["status"]
    return trials


def test_expand_grid_crosses_values():
    grid = expand_grid({"teacher_train.lr": [1e-3, 1e-4], "loss.alpha": [0.5]})
    assert grid == [{"loss.alpha": 0.5, "teacher_train.lr": 1e-3}, {"loss.alpha": 0.5, "teacher_train.lr": 1e-4}]
    assert expand_grid({}) == [{}]
    with pytest.raises(ValueError, match="section.key to a non-empty list"):
        expand_grid({"lr": [1]})


def test_fold_rows_follow_splits_file(baby_config):
    records = prepare_data(baby_config).to_dict(orient="records")
    splits = read_splits(baby_config.splits_file)
    for fold in range(baby_config.data.split.folds):
        rows = fold_rows(records, splits, fold, ["isbi2014_train45"])
        val = {row["id"] for row in rows if row["split"] == "val"}
        assert val == {i for i in splits["folds"][fold]["val"] if i.startswith("isbi2014_train45/")}
        assert all(row["source"] == "isbi2014_train45" for row in rows)
        assert not {row["id"] for row in rows} & set(splits["test"])


def test_summary_mean_and_std():
    table = pd.DataFrame({
        "params": ["{}"] * 3, "status": ["ok", "ok", "error"],
        "val_dice": [0.6, 0.8, None], "val_dice_cytoplasm": [0.5, 0.7, None],
        "val_dice_nucleus": [0.4, 0.6, None], "val_dice_cell": [0.9, 0.9, None],
    })
    summary = summarize(table)
    assert summary.loc[0, "folds_ok"] == 2
    assert summary.loc[0, "folds_failed"] == 1
    assert summary.loc[0, "val_dice_mean"] == pytest.approx(0.7)
    assert summary.loc[0, "val_dice_std"] == pytest.approx(0.1414, abs=1e-4)  # sample std of 0.6, 0.8
    assert summary.loc[0, "val_dice_cell_std"] == pytest.approx(0.0)


def test_cv_restore_after_kill_runs_only_missing_folds(ray_cluster, baby_config, tmp_path, data_root):
    config = with_overrides(
        baby_config, run__name="cv-kill", cv__folds=[0, 1, 2], cv__max_concurrent_trials=1,
        teacher_train__epochs=2, cv__sources=["isbi2014_train45"],
    )
    config_path = tmp_path / "cv.yaml"
    save_config(config, config_path)
    experiment = Path(config.storage_path) / sweep_name(config, config.cv.name)

    # First run in its own process (and its own local Ray): kill it once one fold is finished.
    env = {**os.environ, "RAY_ADDRESS": ""}
    process = subprocess.Popen(
        [sys.executable, "-m", "cervi_ray.cli", "cv", "--config", str(config_path)],
        cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 600
    try:
        while "TERMINATED" not in _trial_states(experiment).values():
            assert process.poll() is None, "the sweep exited before any fold finished"
            assert time.monotonic() < deadline, "no fold finished within 10 minutes"
            time.sleep(0.5)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    finished_before = {tid for tid, status in _trial_states(experiment).items() if status == "TERMINATED"}
    assert 1 <= len(finished_before) < 3
    progress_before = {
        path.parent.name: path.read_bytes() for path in experiment.glob("*/progress.csv")
        if any(tid in path.parent.name for tid in finished_before)
    }

    # Restore in this process: finished folds are kept as they are, the others complete.
    records = prepare_data(config).to_dict(orient="records")
    table, summary = run_cv(config, records, read_splits(config.splits_file))
    assert sorted(table["fold"]) == [0, 1, 2]
    assert (table["status"] == "ok").all(), table[["fold", "status", "error"]]
    for name, content in progress_before.items():
        assert (experiment / name / "progress.csv").read_bytes() == content, f"finished trial {name} ran again"
    assert summary.loc[0, "folds_ok"] == 3
    paths = write_cv_outputs(tmp_path / "out", table, summary)
    assert "+-" in paths["markdown"].read_text()
    assert pd.read_parquet(paths["folds"]).shape[0] == 3


@pytest.fixture
def baby_student_checkpoint(baby_config, tmp_path):
    """An untrained baby student saved as a checkpoint: enough to exercise pruning."""
    folder = tmp_path / "student"
    model = build_student(baby_config.model, 3)
    save_checkpoint(folder, model, describe_model(baby_config, "student"))
    return folder


def test_prune_search_table_and_selection(ray_cluster, baby_config, baby_student_checkpoint, tmp_path):
    config = with_overrides(
        baby_config, run__name="prune", prune__sparsities=[0.3, 0.6], prune__structured_keep_ratio=0.5,
        prune__distill=False, prune__finetune__epochs=1, prune__finetune__val_every=1, prune__tolerance=1.0,
    )
    rows = prepare_data(config).to_dict(orient="records")
    student = checkpoint_from_uri(str(baby_student_checkpoint))
    table, selection = run_prune_search(config, rows, student, None)

    assert list(table["kind"]) == ["none", "magnitude", "magnitude", "structured"]
    assert (table["status"] == "ok").all()
    unpruned = table[table["kind"] == "none"].iloc[0]
    magnitude = table[table["kind"] == "magnitude"].sort_values("sparsity")
    structured = table[table["kind"] == "structured"].iloc[0]
    # zeroed weights: more zeros, same dense size
    assert list(magnitude["nonzero_parameters"]) == sorted(magnitude["nonzero_parameters"], reverse=True)
    assert (magnitude["nonzero_parameters"] < unpruned["nonzero_parameters"]).all()
    assert (magnitude["parameters"] == unpruned["parameters"]).all()
    assert (magnitude["gzip_bytes"] < unpruned["gzip_bytes"]).all()
    # removed structure: fewer parameters in the saved model
    assert structured["parameters"] < unpruned["parameters"]
    # with a tolerance of 1.0 every step is kept, so the sparsest candidate is chosen
    assert json.loads(selection["magnitude"]["candidate"])["sparsity"] == 0.6

    # the fine-tuned structured model reloads from its checkpoint with its reduced shapes
    with checkpoint_from_uri(structured["checkpoint"]).as_directory() as folder:
        model, meta = load_model(folder)
    assert meta["pruning"]["kind"] == "structured"
    paths = write_prune_outputs(tmp_path / "out", table, selection)
    assert "val_dice_after_finetune" in paths["markdown"].read_text()


def test_select_stops_at_first_drop():
    table = pd.DataFrame({
        "kind": ["none", "magnitude", "magnitude", "magnitude"],
        "candidate": ["unpruned", "a", "b", "c"],
        "sparsity": [0.0, 0.2, 0.4, 0.6],
        "threshold": [0.0, 0.1, 0.2, 0.3],
        "status": ["ok"] * 4,
        "checkpoint": [""] * 4,
        # 0.4 drops out of tolerance, so 0.6 is not reached even though it recovered
        "val_dice_after_finetune": [0.80, 0.79, 0.70, 0.80],
    })
    selection = select(table, reference=0.80, tolerance=0.02)
    assert selection["magnitude"]["sparsity"] == 0.2
    assert "structured" not in selection
