"""Evaluation as Ray tasks: one task per checkpoint, results and overlays returned to the driver.

Overlays come back as PNG bytes rather than files written by the task, so the driver writes
them into the run folder even when the task ran on another node.
"""

import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch

from cervi_ray.checkpoint import load_model
from cervi_ray.evaluation import evaluate_rows, model_predictor
from cervi_ray.metrics import to_jsonable
from cervi_ray.models.complexity import count_macs, count_parameters, time_per_image
from cervi_ray.tta import predict_with_tta

logger = logging.getLogger(__name__)


def group_rows_by_source(rows: Sequence[dict], split: str) -> dict[str, list[dict]]:
    """Evaluation sets: the rows of `split`, one set per source, in manifest order."""
    sets: dict[str, list[dict]] = {}
    for row in rows:
        if row["split"] == split:
            sets.setdefault(row["source"], []).append(row)
    return sets


def _evaluate_checkpoint(
    checkpoint: ray.train.Checkpoint,
    eval_sets: dict[str, list[dict]],
    n_boot: int,
    max_overlays: int,
    latency_runs: int,
    threads: int,
    tta: list[str] | None = None,
) -> dict[str, Any]:
    torch.set_num_threads(threads)
    with checkpoint.as_directory() as folder:
        model, meta = load_model(folder)
    scale = meta["training_resolution"]["scale"]
    predictor = model_predictor(model, meta["label_mode"], tta=tta)

    results: dict[str, Any] = {"sets": {}, "overlays": {}}
    for name, rows in eval_sets.items():
        with tempfile.TemporaryDirectory(prefix="cervi_ray_overlays_") as overlay_dir:
            result = evaluate_rows(predictor, rows, scale, n_boot, overlay_dir, max_overlays)
            results["overlays"][name] = {
                Path(path).name: Path(path).read_bytes() for path in result.pop("overlays")
            }
        results["sets"][name] = to_jsonable(result)

    config_model = meta["config"]["model"]
    input_size = config_model["input_size"]
    # With TTA every image costs one forward pass per view: time and count the whole ensemble.
    timed = model if not tta else TTAModel(model, tta)
    results["complexity"] = {
        "parameters": count_parameters(model),
        "input_size": input_size,
        "macs": count_macs(timed, input_size, config_model["in_channels"]),
        "seconds_per_image_at_input_size": time_per_image(timed, input_size, runs=latency_runs),
        "threads": threads,
        "tta_views": len(tta) if tta else 1,
    }
    results["meta"] = {key: meta[key] for key in ("model_kind", "label_mode", "code_version", "epoch")}
    results["meta"]["best_val_dice"] = meta.get("best_val_dice")
    return results


class TTAModel(torch.nn.Module):
    """A model whose forward returns TTA-averaged probabilities, for timing and MAC counts."""

    def __init__(self, model: torch.nn.Module, transforms: list[str]):
        super().__init__()
        self.model = model
        self.transforms = transforms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return predict_with_tta(self.model, x, self.transforms).probs


evaluate_checkpoint_task = ray.remote(_evaluate_checkpoint)


def evaluate_checkpoints(
    checkpoints: dict[str, ray.train.Checkpoint],
    eval_sets: dict[str, list[dict]],
    output_dir: Path,
    n_boot: int,
    max_overlays: int,
    latency_runs: int,
    cpus_per_task: int = 1,
    tta: dict[str, list[str]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Evaluate each named checkpoint in its own Ray task; write metrics JSON and overlays.

    `tta` maps a model name to the TTA views it is evaluated with (others use one view).
    Returns {model name: results}. Files: <output_dir>/<model>/metrics.json and
    <output_dir>/<model>/overlays/<set>/<image>.png.
    """
    tta = tta or {}
    futures = {
        name: evaluate_checkpoint_task.options(num_cpus=cpus_per_task).remote(
            checkpoint, eval_sets, n_boot, max_overlays, latency_runs, cpus_per_task, tta.get(name)
        )
        for name, checkpoint in checkpoints.items()
    }
    outputs = {}
    for name, future in futures.items():
        result = ray.get(future)
        model_dir = output_dir / name
        for set_name, images in result.pop("overlays").items():
            for file_name, data in images.items():
                path = model_dir / "overlays" / set_name / file_name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
        model_dir.mkdir(parents=True, exist_ok=True)
        (model_dir / "metrics.json").write_text(json.dumps(result, indent=2))
        logger.info("evaluated %s on %s", name, ", ".join(eval_sets))
        outputs[name] = result
    return outputs
