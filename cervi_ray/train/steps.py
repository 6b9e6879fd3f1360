"""One training epoch and one validation pass, for a plain loop or a Ray Train worker.

No Ray here: distributed work goes through torch.distributed when a process group is
initialised (Ray Train sets one up), so the same functions run in tests and notebooks.
"""

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cervi_ray.data.dataset import to_tensor
from cervi_ray.losses import DistillationLoss, SegmentationLoss
from cervi_ray.metrics import EVAL_CLASSES, confusion_counts, rates_from_counts


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on at least one, so all ranks stop together."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_sum(value).item() > 0)


@dataclass
class DistillParts:
    """Teacher and loss of a distillation run; None fields mean plain supervised training."""

    teacher: nn.Module
    loss: DistillationLoss


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[dict],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    seg_loss: SegmentationLoss,
    distill: DistillParts | None = None,
    grad_clip: float | None = None,
    after_step: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Run one pass over `loader`; returns loss means averaged over every rank's batches.

    `after_step` runs after every optimizer step, e.g. to keep pruned weights at zero.
    """
    model.train()
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # total, soft, feature, seg, batches
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)  # (B, 3, H, W)
        masks = batch["mask"].to(device, non_blocking=True)  # (B, H, W)

        if distill is None:
            logits = model(images)
            loss = seg_loss(logits, masks)
            parts = (loss.detach(), torch.zeros(()), torch.zeros(()), loss.detach())
        else:
            with torch.no_grad():
                teacher_logits, teacher_features = distill.teacher(images, return_features=True)
            logits, projected = model(images)  # StudentWithAdapter returns adapted features
            level = distill_feature_level(model)
            loss, named = distill.loss(logits, teacher_logits, projected, teacher_features[level], masks)
            parts = (named["total"], named["soft"], named["feature"], named["seg"])

        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss became {loss.item()}; lower the learning rate or set "
                "grad_clip in the *_train config section"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        if after_step is not None:
            after_step()

        sums += torch.tensor([float(p) for p in parts] + [1.0], dtype=torch.float64, device=device)

    sums = all_reduce_sum(sums)
    batches = max(sums[4].item(), 1.0)
    return {
        "train_loss": sums[0].item() / batches,
        "train_loss_soft": sums[1].item() / batches,
        "train_loss_feature": sums[2].item() / batches,
        "train_loss_seg": sums[3].item() / batches,
    }


def distill_feature_level(model: nn.Module) -> str:
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return inner.feature_level


@torch.no_grad()
def predict_logits(model: nn.Module, image: np.ndarray, device: torch.device) -> torch.Tensor:
    """Logits (1, K, H, W) for one (H, W, 3) uint8 image; models return logits only in eval."""
    x = to_tensor(image).unsqueeze(0).to(device)  # (H, W, 3) -> (1, 3, H, W)
    output = model(x)
    if isinstance(output, tuple):  # StudentWithAdapter returns (logits, features)
        output = output[0]
    return output


@torch.no_grad()
def validate(
    model: nn.Module,
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    device: torch.device,
    label_mode: str,
) -> dict[str, float]:
    """Pixel-level Dice per class over this rank's (image, mask) pairs, summed over ranks.

    Images and masks are at the training scale (cheap for model selection; final evaluation
    scores at native resolution). val_dice, the selection metric, is the mean Dice of
    cytoplasm and nucleus, or nucleus Dice alone for nucleus-only models.
    """
    model.eval()
    counts = torch.zeros(len(EVAL_CLASSES), 4, dtype=torch.int64)
    for image, mask in pairs:
        logits = predict_logits(model, image, device)  # (1, K, H, W)
        pred = logits.argmax(dim=1).cpu()  # (1, H, W)
        target = torch.from_numpy(mask.astype(np.int64)).unsqueeze(0)
        if label_mode == "nucleus":
            # nucleus-only models predict {0: not nucleus, 1: nucleus}; compare as label 2
            pred = pred * 2
            target = target * 2
        counts += confusion_counts(pred, target).sum(dim=0)
    counts = all_reduce_sum(counts.to(device)).cpu()

    dice = {name: rates_from_counts(counts[index])["dice"] for index, name in enumerate(EVAL_CLASSES)}
    selected = ["nucleus"] if label_mode == "nucleus" else ["cytoplasm", "nucleus"]
    values = [dice[name] for name in selected if not math.isnan(dice[name])]
    result = {f"val_dice_{name}": _finite_or_zero(value) for name, value in dice.items()}
    result["val_dice"] = float(np.mean(values)) if values else 0.0
    return result


def _finite_or_zero(value: float) -> float:
    return 0.0 if math.isnan(value) else float(value)


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
