"""Evaluation with oracle predictors on real images, baselines, overlays and the report."""

from collections import deque

import numpy as np
import pytest
import torch

from cervi_ray.data.dataset import load_eval_pair
from cervi_ray.data.labels import BACKGROUND, CYTOPLASM, NUCLEUS
from cervi_ray.data.manifest import build_manifest
from cervi_ray.evaluation import (
    all_nucleus_predictor,
    evaluate_rows,
    model_predictor,
    multi_otsu_predictor,
)
from cervi_ray.report.markdown import headline_lines, metrics_table


@pytest.fixture(scope="module")
def real_rows(data_root):
    sources = [
        {"name": "isbi2015", "kind": "isbi2015", "path": "isbi2015/Training"},
        {"name": "isbi2014_edf_real", "kind": "isbi2014_edf_real", "path": "isbi2014/edf_real"},
    ]
    manifest = build_manifest(sources, data_root)
    # two full frames and two nucleus-only EDF images keep the test fast
    rows = manifest.to_dict(orient="records")
    return [row for row in rows if row["source"] == "isbi2015"][:2] + [
        row for row in rows if row["source"] == "isbi2014_edf_real"
    ][:2]


def oracle_from_rows(rows, scale):
    """Predictor that returns each row's ground truth, in evaluation order."""
    masks = deque(load_eval_pair(row, scale)[1] for row in rows)

    def predict(image, size):
        mask = masks.popleft()
        assert mask.shape == tuple(size)
        return mask

    return predict


def test_oracle_scores_perfectly(real_rows, tmp_path):
    result = evaluate_rows(oracle_from_rows(real_rows, 0.5), real_rows, 0.5, n_boot=50, overlay_dir=tmp_path, max_overlays=1)
    for name in ("cytoplasm", "nucleus", "cell"):
        assert result["pixel"][name]["dice"] == pytest.approx(1.0)
    # the EDF images are nucleus-only, so only the two frames count for cytoplasm
    assert result["per_image"]["cytoplasm"]["dice"]["n"] == 2
    assert result["per_image"]["nucleus"]["dice"]["n"] == 4
    assert len(result["overlays"]) == 1
    assert (tmp_path / "isbi2015__frame004.png").is_file()


def test_all_background_scores_zero_dice(real_rows):
    def background(image, size):
        return np.zeros(size, dtype=np.uint8)

    result = evaluate_rows(background, real_rows, 1.0, n_boot=10)
    assert result["pixel"]["nucleus"]["dice"] == 0.0
    assert result["pixel"]["nucleus"]["specificity"] == 1.0  # no false positives at all


def test_metrics_at_native_resolution(real_rows):
    # A predictor fed a half-size image must still be scored on the full 1024 x 1024 mask.
    sizes = []

    def record(image, size):
        sizes.append((image.shape[:2], tuple(size)))
        return np.zeros(size, dtype=np.uint8)

    evaluate_rows(record, real_rows[:1], 0.5, n_boot=10)
    assert sizes == [((512, 512), (1024, 1024))]


def test_multi_otsu_orders_intensity():
    # dark disc on mid-grey on white: nucleus, cytoplasm, background
    image = np.full((40, 40, 3), 230, dtype=np.uint8)
    image[5:35, 5:35] = 150
    image[15:25, 15:25] = 40
    labels = multi_otsu_predictor(image, (40, 40))
    assert labels[20, 20] == NUCLEUS
    assert labels[8, 8] == CYTOPLASM
    assert labels[1, 1] == BACKGROUND
    assert multi_otsu_predictor(image, (80, 80)).shape == (80, 80)


def test_all_nucleus_predictor_shape():
    assert (all_nucleus_predictor(np.zeros((4, 4, 3), np.uint8), (8, 6)) == NUCLEUS).all()


def test_nucleus_only_model_maps_to_label_2():
    class NucleusEverywhere(torch.nn.Module):
        def forward(self, x):
            batch, _, height, width = x.shape
            logits = torch.zeros(batch, 2, height, width)
            logits[:, 1] = 1.0  # class 1 of a nucleus-only model is "nucleus"
            return logits

    labels = model_predictor(NucleusEverywhere(), "nucleus")(np.zeros((8, 8, 3), np.uint8), (16, 16))
    assert labels.shape == (16, 16)
    assert (labels == NUCLEUS).all()


def test_report_tables_format_values():
    result = {
        "pixel": {
            "cytoplasm": {"dice": 0.5},
            "nucleus": {"dice": 0.25},
            "cell": {"dice": 0.75, "sensitivity": 1.0, "specificity": 0.5, "accuracy": 0.6},
        },
        "per_image": {"nucleus": {"dice": {"mean": 0.3, "ci_low": 0.2, "ci_high": 0.4, "n": 3}}},
    }
    table = metrics_table({"student": result})
    assert table[2] == "| student | 0.500 | 0.250 | 0.750 | 1.000 | 0.500 | 0.600 | 0.300 [0.200, 0.400] |"
    lines = headline_lines({"student": {"isbi2014_edf_real": result}})
    assert lines == ["- EDF real images, nucleus Dice: student 0.250"]


def test_ablation_section_replaces_earlier(tmp_path):
    from cervi_ray.ablation import add_to_report

    report = tmp_path / "report.md"
    report.write_text("# run\n\ntext\n")
    add_to_report(report, "# Ablation: demo\n\n| a |\n")
    add_to_report(report, "# Ablation: demo\n\n| b |\n")
    text = report.read_text()
    assert text.count("## Ablation") == 1
    assert "| b |" in text
    assert "| a |" not in text
    add_to_report(tmp_path / "absent.md", "# Ablation\n")  # no report yet: nothing written
    assert not (tmp_path / "absent.md").exists()
