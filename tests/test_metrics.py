"""Tests for cervi_ray.metrics on 2 x 2 label maps whose metrics can be checked by hand.

Labels: 0 background, 1 cytoplasm, 2 nucleus. Counts rows are (tp, fp, fn, tn) and
classes follow EVAL_CLASSES = (cytoplasm, nucleus, cell).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cervi_ray.metrics import (
    COUNT_NAMES,
    EVAL_CLASSES,
    RATE_NAMES,
    SegmentationMetrics,
    confusion_counts,
    pixel_metrics_from_counts,
    rates_from_counts,
    rates_from_counts_batched,
    to_jsonable,
)


def _labels(rows: list[list[int]]) -> torch.Tensor:
    """Return a (1, H, W) int64 label map from nested rows."""
    return torch.tensor(rows, dtype=torch.int64).unsqueeze(0)


# The reference 2 x 2 case used by several tests.
HAND_TARGET = [[0, 1], [2, 2]]
HAND_PRED = [[1, 1], [2, 0]]


# confusion_counts


def test_counts_2x2_by_hand() -> None:
    counts = confusion_counts(_labels(HAND_PRED), _labels(HAND_TARGET))
    assert counts.shape == (1, 3, 4)
    assert counts.dtype == torch.int64
    # cytoplasm: pixel (0, 1) hit, (0, 0) false positive, the 2 nucleus-row pixels negatives.
    assert counts[0, 0].tolist() == [1, 1, 0, 2]
    # nucleus: pixel (1, 0) hit, (1, 1) missed, the top row negatives.
    assert counts[0, 1].tolist() == [1, 0, 1, 2]
    # cell: (0, 1) and (1, 0) hit, (0, 0) false positive, (1, 1) missed, no true negative.
    assert counts[0, 2].tolist() == [2, 1, 1, 0]


def test_counts_match_numpy_loop() -> None:
    generator = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 3, (5, 7, 9), generator=generator)
    target = torch.randint(0, 3, (5, 7, 9), generator=generator)
    counts = confusion_counts(pred, target)

    # Per image and class, count with numpy masks: the batched counts agree exactly.
    for image_index in range(5):
        pred_np, target_np = pred[image_index].numpy(), target[image_index].numpy()
        class_masks = {
            "cytoplasm": (pred_np == 1, target_np == 1),
            "nucleus": (pred_np == 2, target_np == 2),
            "cell": (pred_np > 0, target_np > 0),
        }
        for class_index, class_name in enumerate(EVAL_CLASSES):
            pred_mask, target_mask = class_masks[class_name]
            expected = [
                int(np.sum(pred_mask & target_mask)),
                int(np.sum(pred_mask & ~target_mask)),
                int(np.sum(~pred_mask & target_mask)),
                int(np.sum(~pred_mask & ~target_mask)),
            ]
            assert counts[image_index, class_index].tolist() == expected, (image_index, class_name)


def test_counts_int64_for_uint8_inputs() -> None:
    pred = torch.ones(1, 1024, 1024, dtype=torch.uint8)
    target = torch.ones(1, 1024, 1024, dtype=torch.uint8)
    counts = confusion_counts(pred, target)
    # A 1024 x 1024 all-cytoplasm image: 1,048,576 exact cytoplasm hits, in int64.
    assert counts.dtype == torch.int64
    assert counts[0, 0].tolist() == [1024 * 1024, 0, 0, 0]


def test_counts_reject_shape_mismatch() -> None:
    with pytest.raises(ValueError, match=r"pred \(1, 2, 2\) and target \(1, 3, 3\)"):
        confusion_counts(torch.zeros(1, 2, 2, dtype=torch.int64), torch.zeros(1, 3, 3, dtype=torch.int64))


def test_counts_reject_2d_inputs() -> None:
    with pytest.raises(ValueError, match=r"\(B, H, W\), got pred \(2, 2\)"):
        confusion_counts(torch.zeros(2, 2, dtype=torch.int64), torch.zeros(2, 2, dtype=torch.int64))


@pytest.mark.parametrize("bad_label", [3, -1])
def test_counts_reject_labels_out_of_range(bad_label: int) -> None:
    pred = _labels([[0, 1], [2, bad_label]])
    with pytest.raises(ValueError, match=rf"pred labels must be in \[0, 2\].*got values from {min(bad_label, 0)}"):
        confusion_counts(pred, _labels(HAND_TARGET))


def test_counts_reject_float_pred() -> None:
    with pytest.raises(ValueError, match=r"integer class labels, got dtype torch.float32.*argmax"):
        confusion_counts(torch.zeros(1, 2, 2), _labels(HAND_TARGET))


# rates_from_counts


def test_rates_2x2_by_hand() -> None:
    counts = confusion_counts(_labels(HAND_PRED), _labels(HAND_TARGET))[0]
    cytoplasm, nucleus, cell = (rates_from_counts(row) for row in counts)
    # cytoplasm (1, 1, 0, 2): sensitivity 1/1, specificity 2/3, accuracy 3/4, dice 2/3, precision 1/2.
    assert cytoplasm == pytest.approx(
        {"sensitivity": 1.0, "specificity": 2 / 3, "accuracy": 0.75, "dice": 2 / 3, "precision": 0.5}
    )
    # nucleus (1, 0, 1, 2): sensitivity 1/2, specificity 2/2, accuracy 3/4, dice 2/3, precision 1/1.
    assert nucleus == pytest.approx(
        {"sensitivity": 0.5, "specificity": 1.0, "accuracy": 0.75, "dice": 2 / 3, "precision": 1.0}
    )
    # cell (2, 1, 1, 0): sensitivity 2/3, specificity 0/1, accuracy 2/4, dice 4/6, precision 2/3.
    assert cell == pytest.approx(
        {"sensitivity": 2 / 3, "specificity": 0.0, "accuracy": 0.5, "dice": 2 / 3, "precision": 2 / 3}
    )


def test_rates_nan_for_zero_denominators() -> None:
    # Nothing predicted, nothing in the ground truth: only specificity and accuracy are defined.
    rates = rates_from_counts([0, 0, 0, 4])
    assert math.isnan(rates["sensitivity"])
    assert math.isnan(rates["dice"])
    assert math.isnan(rates["precision"])
    assert rates["specificity"] == 1.0
    assert rates["accuracy"] == 1.0


def test_rates_batched_matches_single_rows() -> None:
    counts = torch.tensor([[[1, 1, 0, 2], [0, 0, 0, 4]], [[2, 1, 1, 0], [3, 0, 0, 1]]])
    batched = rates_from_counts_batched(counts)
    # (2, 2, 4) counts give (2, 2, 5) float64 rates equal to the row-by-row values.
    assert batched.shape == (2, 2, 5)
    assert batched.dtype == torch.float64
    for index in np.ndindex(2, 2):
        expected = list(rates_from_counts(counts[index]).values())
        np.testing.assert_array_equal(batched[index].numpy(), np.array(expected))


def test_rates_exact_beyond_int32() -> None:
    tp = 3_000_000_000  # more than 2**31 pixels
    # fp = tp: precision is exactly 1/2 and the counts come back unchanged as Python ints.
    metrics = pixel_metrics_from_counts(torch.tensor([[tp, tp, 0, 0]] * 3, dtype=torch.int64))
    assert metrics["cell"]["precision"] == 0.5
    assert metrics["cell"]["tp"] == tp


def test_rates_reject_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"shape \(4,\).*got shape \(3,\)"):
        rates_from_counts([1, 2, 3])


def test_rates_reject_negative_counts() -> None:
    with pytest.raises(ValueError, match=r"counts must be >= 0, got negative values \[-1\]"):
        rates_from_counts([1, -1, 0, 0])


# SegmentationMetrics: conventions


def test_metrics_perfect_prediction_all_ones() -> None:
    metrics = SegmentationMetrics()
    target = torch.tensor([[[0, 1, 1], [2, 2, 1], [0, 0, 2]], [[1, 1, 1], [1, 2, 1], [0, 1, 1]]])
    metrics.update(target.clone(), target, ids=["a", "b"])
    result = metrics.compute(n_boot=50)
    # pred == target: every defined rate is 1.0 at pixel level, per image and in the image records.
    for class_name in EVAL_CLASSES:
        for rate_name in RATE_NAMES:
            assert result["pixel"][class_name][rate_name] == 1.0, (class_name, rate_name)
            summary = result["per_image"][class_name][rate_name]
            assert summary["mean"] == 1.0, (class_name, rate_name)
            assert summary["ci_low"] == 1.0, (class_name, rate_name)
            assert summary["ci_high"] == 1.0, (class_name, rate_name)
            assert summary["n"] == 2, (class_name, rate_name)
            for record in result["images"]:
                assert record[class_name][rate_name] == 1.0, (record["id"], class_name, rate_name)


def test_metrics_empty_ground_truth_image() -> None:
    metrics = SegmentationMetrics()
    # Image "a" predicts its 2 cytoplasm pixels exactly. Image "b" has no cytoplasm but 1 predicted.
    metrics.update(_labels([[1, 1], [0, 0]]), _labels([[1, 1], [0, 0]]), ids="a")
    metrics.update(_labels([[1, 0], [0, 0]]), _labels([[0, 0], [0, 0]]), ids="b")
    result = metrics.compute(n_boot=50)

    image_b = result["images"][1]["cytoplasm"]
    # "b" counts (0, 1, 0, 3): Dice and sensitivity NaN by convention, precision 0, specificity 3/4.
    assert math.isnan(image_b["dice"])
    assert math.isnan(image_b["sensitivity"])
    assert image_b["precision"] == 0.0
    assert image_b["specificity"] == 0.75

    per_image = result["per_image"]["cytoplasm"]
    # Per-image Dice: only "a" is defined, so the mean is 1.0 over n = 1.
    assert per_image["dice"]["mean"] == 1.0
    assert per_image["dice"]["n"] == 1
    # Per-image specificity is defined for both: (1 + 3/4) / 2 = 0.875 over n = 2.
    assert per_image["specificity"]["mean"] == 0.875
    assert per_image["specificity"]["n"] == 2

    pixel = result["pixel"]["cytoplasm"]
    # Pixel totals (2, 1, 0, 5): the false positive of "b" lowers Dice to 4/5 and precision to 2/3.
    assert [pixel[name] for name in COUNT_NAMES] == [2, 1, 0, 5]
    assert pixel["dice"] == pytest.approx(0.8)
    assert pixel["precision"] == pytest.approx(2 / 3)
    assert pixel["specificity"] == pytest.approx(5 / 6)
    assert pixel["sensitivity"] == 1.0


def test_metrics_class_absent_everywhere_is_nan() -> None:
    metrics = SegmentationMetrics()
    metrics.update(_labels([[1, 1], [0, 0]]), _labels([[1, 1], [0, 0]]), ids="a")
    result = metrics.compute(n_boot=50)
    # No nucleus in target or prediction: pixel-level Dice is 0 / 0 and no image defines it.
    assert math.isnan(result["pixel"]["nucleus"]["dice"])
    assert result["per_image"]["nucleus"]["dice"]["n"] == 0
    assert math.isnan(result["per_image"]["nucleus"]["dice"]["mean"])
    assert math.isnan(result["per_image"]["nucleus"]["dice"]["ci_low"])
    # Nucleus specificity is still defined: all 4 pixels are true negatives.
    assert result["pixel"]["nucleus"]["specificity"] == 1.0


def test_metrics_nucleus_annotation_evaluates_nucleus_only() -> None:
    metrics = SegmentationMetrics()
    # "f" is fully annotated and predicted exactly.
    metrics.update(_labels([[1, 2], [0, 0]]), _labels([[1, 2], [0, 0]]), ids="f")
    # "n" has nucleus-only ground truth. Its 2 predicted cytoplasm pixels must not count as false positives.
    metrics.update(_labels([[2, 1], [1, 0]]), _labels([[2, 0], [0, 0]]), ids="n", annotations="nucleus")
    result = metrics.compute(n_boot=50)

    # Cytoplasm and cell totals come from "f" alone, nucleus totals from both images.
    assert [result["pixel"]["cytoplasm"][name] for name in COUNT_NAMES] == [1, 0, 0, 3]
    assert [result["pixel"]["cell"][name] for name in COUNT_NAMES] == [2, 0, 0, 2]
    assert [result["pixel"]["nucleus"][name] for name in COUNT_NAMES] == [2, 0, 0, 6]
    assert metrics.pixel_counts().tolist() == [[1, 0, 0, 3], [2, 0, 0, 6], [2, 0, 0, 2]]
    # Per-image means: n = 1 for cytoplasm and cell, n = 2 for nucleus.
    assert result["per_image"]["cytoplasm"]["accuracy"]["n"] == 1
    assert result["per_image"]["cell"]["accuracy"]["n"] == 1
    assert result["per_image"]["nucleus"]["accuracy"]["n"] == 2
    # The record of "n" holds only the nucleus class.
    assert set(result["images"][1]) == {"id", "annotation", "nucleus"}
    assert result["images"][1]["annotation"] == "nucleus"


def test_metrics_nucleus_only_split() -> None:
    metrics = SegmentationMetrics()
    metrics.update(_labels([[2, 1], [1, 0]]), _labels([[2, 0], [0, 0]]), ids="n", annotations="nucleus")
    result = metrics.compute(n_boot=50)
    # No image evaluates cytoplasm: zero totals, NaN rates and n = 0.
    assert [result["pixel"]["cytoplasm"][name] for name in COUNT_NAMES] == [0, 0, 0, 0]
    assert math.isnan(result["pixel"]["cytoplasm"]["accuracy"])
    assert result["per_image"]["cytoplasm"]["accuracy"]["n"] == 0


def test_metrics_cell_merges_cytoplasm_and_nucleus() -> None:
    metrics = SegmentationMetrics()
    # Cytoplasm predicted as nucleus and nucleus as cytoplasm: both classes wrong, every cell pixel right.
    metrics.update(_labels([[2, 2], [1, 0]]), _labels([[1, 1], [2, 0]]), ids="swap")
    result = metrics.compute(n_boot=50)
    # cytoplasm (0, 1, 2, 1) and nucleus (0, 2, 1, 1): Dice 0.
    assert result["pixel"]["cytoplasm"]["dice"] == 0.0
    assert result["pixel"]["nucleus"]["dice"] == 0.0
    # cell (3, 0, 0, 1): Dice, sensitivity and specificity 1.
    assert [result["pixel"]["cell"][name] for name in COUNT_NAMES] == [3, 0, 0, 1]
    assert result["pixel"]["cell"]["dice"] == 1.0
    assert result["pixel"]["cell"]["sensitivity"] == 1.0
    assert result["pixel"]["cell"]["specificity"] == 1.0


# SegmentationMetrics: bootstrap


def _metrics_with_hits(hits_per_image: list[int]) -> SegmentationMetrics:
    """Return metrics of 1 x 8 images with 4 cytoplasm pixels, of which k are predicted.

    The per-image cytoplasm Dice is 2k / (k + 4): k = 0, 1, 2, 3, 4 give 0, 0.4, 2/3, 6/7, 1.
    """
    metrics = SegmentationMetrics()
    target = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0]])
    for index, hits in enumerate(hits_per_image):
        pred = torch.tensor([[1] * hits + [0] * (8 - hits)])
        metrics.update(pred, target, ids=f"image-{index}")
    return metrics


def test_bootstrap_deterministic_for_seed() -> None:
    metrics = _metrics_with_hits([4, 2, 0, 3, 1, 4])
    first = metrics.compute(n_boot=200, seed=7)["per_image"]
    second = metrics.compute(n_boot=200, seed=7)["per_image"]
    other_seed = metrics.compute(n_boot=200, seed=8)["per_image"]
    # The same seed repeats exactly; another seed moves the interval but not the mean.
    assert first == second
    assert other_seed["cytoplasm"]["dice"]["mean"] == first["cytoplasm"]["dice"]["mean"]
    assert other_seed["cytoplasm"]["dice"] != first["cytoplasm"]["dice"]


def test_bootstrap_interval_contains_mean() -> None:
    metrics = _metrics_with_hits([4, 2, 0, 3, 1, 4])
    summary = metrics.compute(n_boot=500, seed=0)["per_image"]["cytoplasm"]["dice"]
    # Mean of (1, 2/3, 0, 6/7, 0.4, 1) = 0.6540, inside a nondegenerate interval.
    assert summary["mean"] == pytest.approx((1 + 2 / 3 + 0 + 6 / 7 + 0.4 + 1) / 6)
    assert summary["ci_low"] < summary["mean"] < summary["ci_high"]
    assert summary["n"] == 6


def test_bootstrap_matches_reference_resampling() -> None:
    dice_values = [1.0, 2 / 3, 0.0, 6 / 7, 0.4]
    metrics = _metrics_with_hits([4, 2, 0, 3, 1])
    summary = metrics.compute(n_boot=300, seed=3, ci=0.9)["per_image"]["cytoplasm"]["dice"]
    # Resample the 5 images with default_rng(3), average each replicate, take percentiles 5 and 95.
    indices = np.random.default_rng(3).integers(0, 5, size=(300, 5))
    replicate_means = np.array(dice_values)[indices].mean(axis=1)
    expected_low, expected_high = np.percentile(replicate_means, [5.0, 95.0])
    assert summary["ci_low"] == pytest.approx(expected_low)
    assert summary["ci_high"] == pytest.approx(expected_high)


def test_bootstrap_collapses_when_images_agree() -> None:
    metrics = _metrics_with_hits([2] * 5)
    summary = metrics.compute(n_boot=100)["per_image"]["cytoplasm"]["dice"]
    # Five images with Dice 2/3: mean and both interval ends are 2/3.
    assert summary["mean"] == pytest.approx(2 / 3)
    assert summary["ci_low"] == pytest.approx(2 / 3)
    assert summary["ci_high"] == pytest.approx(2 / 3)


def test_bootstrap_skips_undefined_images() -> None:
    metrics = _metrics_with_hits([4, 1])
    # A third image without cytoplasm has NaN Dice, so it changes neither mean nor n.
    metrics.update(torch.zeros(1, 8, dtype=torch.int64), torch.zeros(1, 8, dtype=torch.int64), ids="empty")
    summary = metrics.compute(n_boot=200)["per_image"]["cytoplasm"]["dice"]
    assert summary["mean"] == pytest.approx(0.7)
    assert summary["n"] == 2
    assert 0.4 <= summary["ci_low"] <= summary["ci_high"] <= 1.0


def test_bootstrap_narrower_for_lower_confidence() -> None:
    metrics = _metrics_with_hits([4, 2, 0, 3, 1, 4])
    wide = metrics.compute(n_boot=500, ci=0.95)["per_image"]["cytoplasm"]["dice"]
    narrow = metrics.compute(n_boot=500, ci=0.5)["per_image"]["cytoplasm"]["dice"]
    # A 50 % interval lies inside the 95 % interval of the same replicates.
    assert wide["ci_low"] <= narrow["ci_low"]
    assert narrow["ci_high"] <= wide["ci_high"]


# SegmentationMetrics: storage, export and bad input


def test_metrics_pixel_counts_int64_and_summed() -> None:
    metrics = SegmentationMetrics()
    # Before any update, zeros (3, 4) so that empty ranks can join a sum across ranks.
    assert metrics.pixel_counts().tolist() == [[0] * 4] * 3
    metrics.update(_labels(HAND_PRED), _labels(HAND_TARGET), ids="x")
    metrics.update(_labels(HAND_PRED), _labels(HAND_TARGET), ids="y")
    # Two copies of the reference case: each count doubles, in int64.
    counts = metrics.pixel_counts()
    assert counts.dtype == torch.int64
    assert counts.tolist() == [[2, 2, 0, 4], [2, 0, 2, 4], [4, 2, 2, 0]]
    assert pixel_metrics_from_counts(counts) == metrics.compute(n_boot=10)["pixel"]


def test_metrics_single_image_2d_update() -> None:
    metrics = SegmentationMetrics()
    metrics.update(torch.tensor(HAND_PRED), torch.tensor(HAND_TARGET), ids="single")
    # An (H, W) image with one id is stored as one image.
    assert len(metrics) == 1
    assert metrics.image_counts()[0, 0].tolist() == [1, 1, 0, 2]


def test_metrics_numpy_inputs() -> None:
    metrics = SegmentationMetrics()
    metrics.update(np.array([HAND_PRED]), np.array([HAND_TARGET]), ids=["np"])
    # numpy label maps give the same counts as tensors.
    assert metrics.image_counts()[0].tolist() == [[1, 1, 0, 2], [1, 0, 1, 2], [2, 1, 1, 0]]


def test_metrics_reset_clears_images() -> None:
    metrics = SegmentationMetrics()
    metrics.update(_labels(HAND_PRED), _labels(HAND_TARGET), ids="x")
    metrics.reset()
    # After reset, no image is stored and the same id may be used again.
    assert len(metrics) == 0
    metrics.update(_labels(HAND_PRED), _labels(HAND_TARGET), ids="x")
    assert len(metrics) == 1


def test_to_jsonable_replaces_nan() -> None:
    metrics = SegmentationMetrics()
    metrics.update(_labels([[1, 0], [0, 0]]), _labels([[0, 0], [0, 0]]), ids="empty")
    result = to_jsonable(metrics.compute(n_boot=10))
    # Strict JSON (allow_nan=False) works, and the undefined per-image Dice becomes null.
    decoded = json.loads(json.dumps(result, allow_nan=False))
    assert decoded["images"][0]["cytoplasm"]["dice"] is None
    assert decoded["per_image"]["cytoplasm"]["dice"]["mean"] is None
    assert decoded["images"][0]["cytoplasm"]["fp"] == 1


def test_to_jsonable_converts_numpy_scalars() -> None:
    # numpy scalars become Python numbers, NaN becomes None and tuples become lists.
    assert to_jsonable({"a": np.float64("nan"), "b": (np.int64(3), 0.5)}) == {"a": None, "b": [3, 0.5]}


def test_compute_rejects_empty_metrics() -> None:
    with pytest.raises(ValueError, match=r"no images to evaluate.*update\(\)"):
        SegmentationMetrics().compute()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_boot": 0}, "n_boot must be >= 1, got 0"),
        ({"ci": 1.5}, r"ci must be in \(0, 1\), got 1.5"),
    ],
)
def test_compute_rejects_bad_bootstrap_options(kwargs: dict[str, float], message: str) -> None:
    metrics = SegmentationMetrics()
    metrics.update(_labels(HAND_PRED), _labels(HAND_TARGET), ids="x")
    with pytest.raises(ValueError, match=message):
        metrics.compute(**kwargs)


def test_update_rejects_shape_mismatch() -> None:
    metrics = SegmentationMetrics()
    with pytest.raises(ValueError, match=r"pred \(2, 2, 2\) and target \(2, 3, 3\)"):
        metrics.update(torch.zeros(2, 2, 2, dtype=torch.int64), torch.zeros(2, 3, 3, dtype=torch.int64), ids=["a", "b"])


def test_update_rejects_label_out_of_range() -> None:
    metrics = SegmentationMetrics()
    with pytest.raises(ValueError, match=r"target labels must be in \[0, 2\].*from 0 to 5"):
        metrics.update(_labels(HAND_PRED), _labels([[0, 1], [2, 5]]), ids="x")


def test_update_rejects_wrong_number_of_ids() -> None:
    metrics = SegmentationMetrics()
    pred = torch.zeros(3, 2, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="got 2 ids for a batch of 3"):
        metrics.update(pred, pred, ids=["a", "b"])
    with pytest.raises(ValueError, match="single id 'a' for a batch of 3 images"):
        metrics.update(pred, pred, ids="a")
    # A rejected batch stores nothing.
    assert len(metrics) == 0


def test_update_rejects_non_string_ids() -> None:
    metrics = SegmentationMetrics()
    pred = torch.zeros(2, 2, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="ids must be strings, got 0 of type int"):
        metrics.update(pred, pred, ids=[0, 1])  # type: ignore[list-item]


def test_update_rejects_duplicate_ids() -> None:
    metrics = SegmentationMetrics()
    pred = torch.zeros(2, 2, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"unique, got \['a'\]"):
        metrics.update(pred, pred, ids=["a", "a"])
    metrics.update(pred, pred, ids=["a", "b"])
    # An id stored by an earlier update is rejected too.
    with pytest.raises(ValueError, match=r"unique, got \['b'\].*reset\(\)"):
        metrics.update(pred, pred, ids=["b", "c"])


def test_update_rejects_bad_annotations() -> None:
    metrics = SegmentationMetrics()
    pred = torch.zeros(2, 2, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"one of \('full', 'nucleus'\), got 'cells'"):
        metrics.update(pred, pred, ids=["a", "b"], annotations="cells")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="got 1 for a batch of 2"):
        metrics.update(pred, pred, ids=["a", "b"], annotations=["full"])


def test_update_rejects_cytoplasm_in_nucleus_annotation() -> None:
    metrics = SegmentationMetrics()
    # A nucleus-only image cannot contain cytoplasm labels in its ground truth.
    with pytest.raises(ValueError, match=r"'n' is annotated 'nucleus' but its target contains cytoplasm"):
        metrics.update(_labels(HAND_PRED), _labels(HAND_TARGET), ids="n", annotations="nucleus")
