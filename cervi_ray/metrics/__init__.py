"""Pixel counts and segmentation metrics for cytoplasm, nucleus and cell.

Conventions:

- Evaluated classes, in the order EVAL_CLASSES = ("cytoplasm", "nucleus", "cell"):
  "cytoplasm" is label 1 against all other labels, "nucleus" is label 2 against all other
  labels, and "cell" is the binary foreground, label > 0. The cell class merges cytoplasm
  and nucleus, so a cytoplasm pixel predicted as nucleus is a correct cell pixel.
- Images annotated "nucleus" carry nucleus-only ground truth, where label 0 means "not
  nucleus". Only their "nucleus" class is evaluated. Their cytoplasm and cell counts are
  excluded from every total, mean and image record.
- Per image and class, the counts are TP, FP, FN and TN pixels, and
  sensitivity = TP / (TP + FN), specificity = TN / (TN + FP), accuracy = (TP + TN) / all,
  dice = 2 TP / (2 TP + FP + FN) and precision = TP / (TP + FP).
  A rate whose denominator is zero is NaN.
- Empty ground truth: when an image has no pixel of a class in its ground truth
  (TP + FN = 0), its per-image Dice and sensitivity for that class are NaN. They are left
  out of the per-image mean and its confidence interval. The image's false positives still
  count in the pixel-level totals, where they lower Dice, precision and specificity.
- Pixel-level metrics: TP, FP, FN and TN are summed over all images of the split that
  evaluate the class, and the rates are computed from the sums.
- Per-image metrics: the mean over images with a defined (non-NaN) value, and a percentile
  bootstrap confidence interval. Each bootstrap replicate resamples all images with
  replacement and takes the mean of the defined values. The same replicates serve every
  class and metric. n is the number of images with a defined value.

Counts are int64 throughout, so splits of hundreds of 1024 x 1024 images cannot overflow.
Shape vocabulary: B images in a batch, N images in total, H and W spatial size.
"""

from cervi_ray.metrics.counts import (
    COUNT_NAMES,
    EVAL_CLASSES,
    EVALUATED_CLASSES,
    RATE_NAMES,
    EvalClass,
    confusion_counts,
    pixel_metrics_from_counts,
    rates_from_counts,
    rates_from_counts_batched,
)
from cervi_ray.metrics.segmentation import SegmentationMetrics, to_jsonable

__all__ = [
    "COUNT_NAMES",
    "EVAL_CLASSES",
    "EVALUATED_CLASSES",
    "RATE_NAMES",
    "EvalClass",
    "SegmentationMetrics",
    "confusion_counts",
    "pixel_metrics_from_counts",
    "rates_from_counts",
    "rates_from_counts_batched",
    "to_jsonable",
]
