"""The Ray Train worker function shared by teacher training and distillation."""

import logging
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, DistributedSampler

from cervi_ray.checkpoint import (
    MODEL_FILE,
    describe_model,
    load_adapter_state,
    load_model,
    load_training_state,
    read_meta,
    save_checkpoint,
)
from cervi_ray.config import Config
from cervi_ray.data.augment import build_train_augmentation
from cervi_ray.data.dataset import SegmentationDataset, rescale
from cervi_ray.data.manifest import load_sample
from cervi_ray.losses import DistillationLoss, SegmentationLoss
from cervi_ray.models import FeatureAdapter, StudentWithAdapter, build_model
from cervi_ray.train.steps import DistillParts, any_rank, train_one_epoch, validate

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_train_dataset(
    config: Config, rows: list[dict], rank: int, world_size: int, seed: int
) -> tuple[SegmentationDataset, DistributedSampler]:
    data = config.data
    augment = None
    if data.augment.enabled:
        a = data.augment
        augment = build_train_augmentation(
            hflip_p=a.hflip_p, vflip_p=a.vflip_p, rotate_limit=a.rotate_limit, rotate_p=a.rotate_p,
            occlusion_p=a.occlusion_p, brightness=a.brightness, contrast=a.contrast,
            saturation=a.saturation, jitter_p=a.jitter_p, seed=seed,
        )
    dataset = SegmentationDataset(
        rows, scale=data.scale, crop_size=data.crop_size, resize_to=data.resize_to, augment=augment,
        repeats=data.repeats, label_mode=data.label_mode,
        foreground_crop_p=data.foreground_crop_p, seed=seed,
    )
    # The sampler seed must be equal on every rank, so the shards partition one permutation.
    # Crops and augmentation use the per-rank seed.
    sampler = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=config.run.seed
    )
    return dataset, sampler


def load_validation_pairs(config: Config, rows: list[dict]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image, mask) pairs at the training scale; nucleus-only models get {0, 1} masks."""
    pairs = []
    for row in rows:
        sample = load_sample(row)
        image, mask = rescale(sample.image, sample.mask, config.data.scale)
        if config.data.label_mode == "nucleus":
            mask = (mask == 2).astype(np.uint8)
        pairs.append((image, mask))
    return pairs


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Train the teacher (task "teacher") or distil the student (task "student") on one worker.

    loop_config: {"config": resolved Config as dict, "task": "teacher" | "student",
    "rows": manifest rows with their split, "teacher_checkpoint": ray.train.Checkpoint (student)}.
    """
    # Ray logs each report with its whole metrics dict at INFO; the epoch line below is shorter.
    logging.getLogger("ray.train.v2._internal.execution.context").setLevel(logging.WARNING)
    config = Config.model_validate(loop_config["config"])
    task = loop_config["task"]
    optim_config = config.teacher_train if task == "teacher" else config.student_train
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(config.scaling.cpus_per_worker)
    seed = config.run.seed + 1000 * rank
    seed_everything(seed)
    device = ray.train.torch.get_device()

    # Data: every worker loads the whole (small) training set; a sampler shards its crops.
    rows = loop_config["rows"]
    train_rows = [row for row in rows if row["split"] == "train"]
    val_rows = [row for row in rows if row["split"] == "val"]
    dataset, sampler = build_train_dataset(config, train_rows, rank, world_size, seed)
    loader = DataLoader(
        dataset, batch_size=optim_config.batch_size_per_worker, sampler=sampler, drop_last=True,
        num_workers=0,
    )
    val_pairs = load_validation_pairs(config, val_rows[rank::world_size])

    # Model, and for distillation the frozen teacher and the feature adapter.
    num_classes = config.data.num_classes
    model = build_model(task, config.model, num_classes)
    distill = None
    if task == "student":
        with loop_config["teacher_checkpoint"].as_directory() as teacher_dir:
            teacher, teacher_meta = load_model(teacher_dir, device=device)
        if teacher_meta["num_classes"] != num_classes:
            raise ValueError(
                f"teacher predicts {teacher_meta['num_classes']} classes but the student is "
                f"configured for {num_classes} (data.label_mode={config.data.label_mode!r}); "
                "train the teacher with the same label_mode"
            )
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
        level = config.distill.feature_level
        adapter = FeatureAdapter(model.feature_channels[level], teacher.feature_channels[level])
        model = StudentWithAdapter(model, adapter, level)
        d = config.distill
        distill = DistillParts(
            teacher=teacher,
            loss=DistillationLoss(
                temperature=d.temperature, soft_weight=d.soft_weight,
                feature_weight=d.feature_weight, seg_weight=d.seg_weight,
                seg_loss=SegmentationLoss(config.loss.alpha, config.loss.dice_smooth),
            ),
        )
    model.to(device)
    seg_loss = SegmentationLoss(config.loss.alpha, config.loss.dice_smooth)
    optimizer = torch.optim.AdamW(model.parameters(), lr=optim_config.lr, weight_decay=optim_config.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=optim_config.plateau_factor,
        patience=optim_config.plateau_patience, min_lr=optim_config.min_lr,
    )

    # Resume: the latest checkpoint of this run name, if the run was relaunched or restarted.
    state = {
        "epoch": 0, "best_val_dice": -1.0, "stale_validations": 0, "history": [],
        "train_seconds": 0.0, "stopped": "",
    }
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = _restore(folder, model, optimizer, scheduler, state)
        if rank == 0:
            logger.info("%s: resuming after epoch %d from %s", task, state["epoch"], checkpoint.path)
        if _finished(state, optim_config):
            if rank == 0:
                logger.info(
                    "%s: the run already stopped at epoch %d (%s); nothing to do. Raise the epochs "
                    "or max_minutes, or choose another run.name, to train further.",
                    task, state["epoch"], state["stopped"] or "epoch limit",
                )
            return
    ddp_model = ray.train.torch.prepare_model(model, move_to_device=False)

    meta_base = describe_model(config, task)
    resumed_from_epoch = state["epoch"]
    start_time = time.monotonic() - state["train_seconds"]
    for epoch in range(state["epoch"] + 1, optim_config.epochs + 1):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        metrics = train_one_epoch(
            ddp_model, loader, optimizer, device, seg_loss, distill, optim_config.grad_clip
        )
        elapsed = time.monotonic() - start_time
        metrics.update(
            epoch=epoch, lr=optimizer.param_groups[0]["lr"], train_seconds=elapsed,
            resumed_from_epoch=resumed_from_epoch,
        )
        over_budget = optim_config.max_minutes is not None and elapsed > 60 * optim_config.max_minutes
        over_budget = any_rank(over_budget, device)
        last_epoch = epoch == optim_config.epochs
        if epoch % optim_config.val_every != 0 and not last_epoch and not over_budget:
            state["history"].append(dict(metrics))
            ray.train.report(metrics)
            continue

        metrics.update(validate(ddp_model, val_pairs, device, config.data.label_mode))
        scheduler.step(metrics["val_dice"])
        improved = metrics["val_dice"] > state["best_val_dice"] + 1e-4
        state["best_val_dice"] = max(state["best_val_dice"], metrics["val_dice"])
        state["stale_validations"] = 0 if improved else state["stale_validations"] + 1
        early_stop = state["stale_validations"] >= optim_config.early_stop_patience
        metrics.update(best_val_dice=state["best_val_dice"], is_best=improved)
        stop = early_stop or over_budget or last_epoch
        reason = ""
        if early_stop:
            reason = "early_stop"
        elif over_budget:
            reason = "time_budget"
        metrics["stopped"] = state["stopped"] = reason
        state.update(epoch=epoch, train_seconds=elapsed)
        state["history"].append(dict(metrics))
        if rank == 0:
            logger.info(
                "%s epoch %d/%d: train_loss %.4f val_dice %.4f (best %.4f) lr %.2e %.0fs",
                task, epoch, optim_config.epochs, metrics["train_loss"], metrics["val_dice"],
                state["best_val_dice"], metrics["lr"], elapsed,
            )
        _report_with_checkpoint(
            rank, metrics, model, optimizer, scheduler, meta_base, state, distill is not None
        )
        if stop:
            break


def _finished(state: dict[str, Any], optim_config) -> bool:
    """True when a restored run has nothing left to do under the current limits."""
    if state["stopped"] == "early_stop" or state["epoch"] >= optim_config.epochs:
        return True
    budget = optim_config.max_minutes
    return state["stopped"] == "time_budget" and budget is not None and state["train_seconds"] >= 60 * budget


def _report_with_checkpoint(rank, metrics, model, optimizer, scheduler, meta_base, state, distilling):
    # Each rank gets its own temporary folder; only rank 0 writes and reports a checkpoint.
    with tempfile.TemporaryDirectory(prefix=f"cervi_ray_rank{rank}_") as folder:
        checkpoint = None
        if rank == 0:
            meta = dict(meta_base, **state, metrics=metrics)
            network = model.student if distilling else model
            adapter = model.adapter if distilling else None
            save_checkpoint(folder, network, meta, adapter=adapter, optimizer=optimizer, scheduler=scheduler)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)


def _restore(folder, model, optimizer, scheduler, state) -> dict[str, Any]:
    folder = Path(folder)
    meta = read_meta(folder)
    network = model.student if isinstance(model, StudentWithAdapter) else model
    network.load_state_dict(load_file(str(folder / MODEL_FILE)))
    if isinstance(model, StudentWithAdapter):
        adapter_state = load_adapter_state(folder)
        if adapter_state is not None:
            model.adapter.load_state_dict(adapter_state)
    training_state = load_training_state(folder)
    if training_state is not None:
        optimizer.load_state_dict(training_state["optimizer"])
        if "scheduler" in training_state:
            scheduler.load_state_dict(training_state["scheduler"])
    return {key: meta.get(key, default) for key, default in state.items()}
