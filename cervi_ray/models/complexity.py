"""Parameter counts, multiply-accumulates and CPU/GPU latency per image."""

import statistics
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_size: int, in_channels: int = 3) -> int:
    """Multiply-accumulates of one forward pass on a (1, C, S, S) input.

    torch's FlopCounterMode counts 2 FLOPs per multiply-accumulate in convolutions, matrix
    products and attention; element-wise work (norms, activations) is not counted, as usual
    for MAC figures.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = torch.zeros(1, in_channels, input_size, input_size, device=device)
    with FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops() // 2


@torch.no_grad()
def time_per_image(
    model: nn.Module, input_size: int, runs: int = 5, in_channels: int = 3, warmup: int = 1
) -> float:
    """Median seconds of a forward pass on one (1, C, S, S) image, after warm-up passes."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = torch.randn(1, in_channels, input_size, input_size, device=device)
    timings = []
    for index in range(warmup + runs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index >= warmup:
            timings.append(time.perf_counter() - start)
    model.train(was_training)
    return statistics.median(timings)
