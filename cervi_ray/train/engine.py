"""The training loop shared by Ray Train workers, Ray Tune trials and plain processes.

The loop talks to its host through a `Session`: rank, device, checkpoint restore and report.
So the same code trains the teacher on N Ray Train workers, a fold inside a Tune trial, and a
model in a test without Ray.
"""

import contextlib
import logging
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file
from torch import nn
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
from cervi_ray.config import Config, OptimConfig
from cervi_ray.data.augment import build_train_augmentation
from cervi_ray.data.dataset import SegmentationDataset, rescale
from cervi_ray.data.manifest import load_sample
from cervi_ray.losses import DistillationLoss, SegmentationLoss
from cervi_ray.models import FeatureAdapter, StudentWithAdapter, build_model
from cervi_ray.pruning.magnitude import enforce_masks, load_masks, save_masks
from cervi_ray.tracking import TrackedSession, training_tracker
from cervi_ray.train.steps import DistillParts, any_rank, train_one_epoch, validate

logger = logging.getLogger(__name__)


class TrainingJob(BaseModel):
    """One training run: model kind, distillation, optimiser settings and start weights."""

    model_config = ConfigDict(extra="forbid")

    label: str  # run-name suffix, e.g. "teacher" or "student"
    model_kind: str  # teacher, student, unet, unetplusplus or deeplabv3
    distill: bool = False
    optim: OptimConfig
    initial_weights: str | None = None  # checkpoint folder to start from (fine-tuning)
    masks_file: str | None = None  # magnitude masks kept enforced after every step
    extra_meta: dict[str, Any] = {}  # copied into every checkpoint's meta.json
    tracking_parent_run_id: str | None = None  # MLflow run to nest this run under (demo or sweep)


class Session(Protocol):
    """Host of the loop: a Ray Train worker, a Tune trial or a plain process.

    Optional members, read by cervi_ray.tracking.training_tracker: `mlflow_starter` and
    `tracking_suffix`.
    """

    rank: int
    world_size: int
    device: torch.device

    def restored_checkpoint(self) -> AbstractContextManager[Path] | None: ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None: ...

    def wrap_model(self, model: nn.Module) -> nn.Module: ...


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


def _build_network(config: Config, job: TrainingJob) -> tuple[nn.Module, dict[str, Any]]:
    """Build a fresh network, or load the one in job.initial_weights (pruned shapes included)."""
    if job.initial_weights is None:
        return build_model(job.model_kind, config.model, config.data.num_classes), {}
    model, meta = load_model(job.initial_weights)
    if meta["model_kind"] != job.model_kind:
        raise ValueError(
            f"initial weights {job.initial_weights} are a {meta['model_kind']}, but this run "
            f"trains a {job.model_kind}"
        )
    inherited = {key: meta[key] for key in ("pruned_shapes", "pruning") if key in meta}
    return model.train(), inherited


def _build_distillation(
    config: Config, student: nn.Module, teacher_dir: Path, device: torch.device
) -> tuple[nn.Module, DistillParts]:
    teacher, teacher_meta = load_model(teacher_dir, device=device)
    num_classes = config.data.num_classes
    if teacher_meta["num_classes"] != num_classes:
        raise ValueError(
            f"teacher predicts {teacher_meta['num_classes']} classes but the student is "
            f"configured for {num_classes} (data.label_mode={config.data.label_mode!r}); "
            "train the teacher with the same label_mode"
        )
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    level = config.distill.feature_level
    adapter = FeatureAdapter(student.feature_channels[level], teacher.feature_channels[level])
    d = config.distill
    parts = DistillParts(
        teacher=teacher,
        loss=DistillationLoss(
            temperature=d.temperature, soft_weight=d.soft_weight,
            feature_weight=d.feature_weight, seg_weight=d.seg_weight,
            seg_loss=SegmentationLoss(config.loss.alpha, config.loss.dice_smooth),
        ),
    )
    return StudentWithAdapter(student, adapter, level), parts


def run_training(
    config: Config,
    job: TrainingJob,
    rows: list[dict],
    session: Session,
    teacher_dir: Path | None = None,
) -> None:
    """Train `job` on the train rows, validate on the val rows, report through `session`.

    With config.tracking on, rank 0 also records the run to MLflow and TensorBoard.
    """
    with training_tracker(config, job, session) as tracker:
        _train(config, job, rows, TrackedSession(session, tracker), teacher_dir)


def _train(config: Config, job: TrainingJob, rows: list[dict], session: Session, teacher_dir: Path | None) -> None:
    optim_config = job.optim
    rank, world_size, device = session.rank, session.world_size, session.device
    seed = config.run.seed + 1000 * rank
    seed_everything(seed)

    # Data: every worker loads the whole (small) training set; a sampler shards its crops.
    train_rows = [row for row in rows if row["split"] == "train"]
    val_rows = [row for row in rows if row["split"] == "val"]
    if not train_rows:
        raise ValueError("no training images: every row of the manifest is outside the train split")
    dataset, sampler = build_train_dataset(config, train_rows, rank, world_size, seed)
    loader = DataLoader(
        dataset, batch_size=optim_config.batch_size_per_worker, sampler=sampler, drop_last=True,
        num_workers=0,
    )
    val_pairs = load_validation_pairs(config, val_rows[rank::world_size])

    # Model, and for distillation the frozen teacher and the feature adapter.
    model, inherited_meta = _build_network(config, job)
    distill = None
    if job.distill:
        if teacher_dir is None:
            raise ValueError(f"{job.label}: distillation needs a teacher checkpoint")
        model, distill = _build_distillation(config, model, teacher_dir, device)
    model.to(device)
    masks = load_masks(job.masks_file) if job.masks_file else None
    after_step = _mask_enforcer(model, masks)
    seg_loss = SegmentationLoss(config.loss.alpha, config.loss.dice_smooth)
    optimizer = torch.optim.AdamW(model.parameters(), lr=optim_config.lr, weight_decay=optim_config.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=optim_config.plateau_factor,
        patience=optim_config.plateau_patience, min_lr=optim_config.min_lr,
    )

    # Resume: the latest checkpoint of this run, if it was relaunched or restarted.
    state = {
        "epoch": 0, "best_val_dice": -1.0, "stale_validations": 0, "history": [],
        "train_seconds": 0.0, "stopped": "",
    }
    restored = session.restored_checkpoint()
    if restored is not None:
        with restored as folder:
            state = _restore(folder, model, optimizer, scheduler, state)
        if rank == 0:
            logger.info("%s: resuming after epoch %d", job.label, state["epoch"])
        if _finished(state, optim_config):
            if rank == 0:
                logger.info(
                    "%s: the run already stopped at epoch %d (%s); nothing to do. Raise the epochs "
                    "or max_minutes, or choose another run.name, to train further.",
                    job.label, state["epoch"], state["stopped"] or "epoch limit",
                )
            return
    wrapped = session.wrap_model(model)

    meta_base = dict(describe_model(config, job.model_kind), **inherited_meta, **job.extra_meta)
    meta_base["distilled"] = job.distill
    resumed_from_epoch = state["epoch"]
    start_time = time.monotonic() - state["train_seconds"]
    for epoch in range(state["epoch"] + 1, optim_config.epochs + 1):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        metrics = train_one_epoch(
            wrapped, loader, optimizer, device, seg_loss, distill, optim_config.grad_clip, after_step
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
            session.report(metrics, None)
            continue

        # Validation epoch: LR schedule, early stopping, checkpoint.
        metrics.update(validate(wrapped, val_pairs, device, config.data.label_mode))
        scheduler.step(metrics["val_dice"])
        improved = metrics["val_dice"] > state["best_val_dice"] + 1e-4
        state["best_val_dice"] = max(state["best_val_dice"], metrics["val_dice"])
        state["stale_validations"] = 0 if improved else state["stale_validations"] + 1
        early_stop = state["stale_validations"] >= optim_config.early_stop_patience
        metrics.update(best_val_dice=state["best_val_dice"], is_best=improved)
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
                job.label, epoch, optim_config.epochs, metrics["train_loss"], metrics["val_dice"],
                state["best_val_dice"], metrics["lr"], elapsed,
            )
        _report_with_checkpoint(session, metrics, model, optimizer, scheduler, meta_base, state, masks)
        if early_stop or over_budget or last_epoch:
            break


def _mask_enforcer(model: nn.Module, masks: dict | None) -> Callable[[], None] | None:
    if masks is None:
        return None
    network = model.student if isinstance(model, StudentWithAdapter) else model

    def enforce() -> None:
        enforce_masks(network, masks)

    enforce()
    return enforce


def _finished(state: dict[str, Any], optim_config: OptimConfig) -> bool:
    """True when a restored run has nothing left to do under the current limits."""
    if state["stopped"] == "early_stop" or state["epoch"] >= optim_config.epochs:
        return True
    budget = optim_config.max_minutes
    return state["stopped"] == "time_budget" and budget is not None and state["train_seconds"] >= 60 * budget


def _report_with_checkpoint(session, metrics, model, optimizer, scheduler, meta_base, state, masks) -> None:
    # Each rank gets its own temporary folder; only rank 0 writes and reports a checkpoint.
    with tempfile.TemporaryDirectory(prefix=f"cervi_ray_rank{session.rank}_") as folder:
        checkpoint_dir = None
        if session.rank == 0:
            meta = dict(meta_base, **state, metrics=metrics)
            distilling = isinstance(model, StudentWithAdapter)
            network = model.student if distilling else model
            adapter = model.adapter if distilling else None
            save_checkpoint(folder, network, meta, adapter=adapter, optimizer=optimizer, scheduler=scheduler)
            if masks is not None:
                save_masks(masks, Path(folder) / "masks.safetensors")
            checkpoint_dir = Path(folder)
        session.report(metrics, checkpoint_dir)


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


class LocalSession:
    """A single process without Ray: checkpoints go to numbered folders under `folder`."""

    def __init__(self, folder: str | Path, device: str = "cpu"):
        self.rank, self.world_size = 0, 1
        self.device = torch.device(device)
        self.folder = Path(folder)
        self.reports: list[dict[str, Any]] = []

    def checkpoints(self) -> list[Path]:
        return sorted(self.folder.glob("checkpoint_*"))

    def restored_checkpoint(self):
        existing = self.checkpoints()
        return contextlib.nullcontext(existing[-1]) if existing else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            target = self.folder / f"checkpoint_{len(self.checkpoints()):06d}"
            shutil.copytree(checkpoint_dir, target)

    def wrap_model(self, model: nn.Module) -> nn.Module:
        return model
