"""Pruning of trained networks, as plain PyTorch.

magnitude: unstructured pruning. Weights under one global magnitude threshold are zeroed and
kept at zero with masks during fine-tuning. Tensor shapes, size and speed stay the same.
structured: removes Swin MLP hidden units and decoder channels of the CerviSegNet student, so
the saved model is smaller and faster. Its checkpoints carry meta["pruned_shapes"].
"""

from cervi_ray.pruning.magnitude import (
    apply_masks,
    enforce_masks,
    global_threshold,
    load_masks,
    magnitude_masks,
    prunable_parameters,
    prune_by_magnitude,
    save_masks,
    sparsity_summary,
)
from cervi_ray.pruning.structured import parameter_shapes, prune_student_structured

__all__ = [
    "apply_masks",
    "enforce_masks",
    "global_threshold",
    "load_masks",
    "magnitude_masks",
    "parameter_shapes",
    "prunable_parameters",
    "prune_by_magnitude",
    "prune_student_structured",
    "save_masks",
    "sparsity_summary",
]
