"""Checkpoint folders: exact round trip, self-description, and refusal to run pickled code."""

import json
import pickle
from pathlib import Path

import pytest
import torch

from cervi_ray.checkpoint import (
    META_FILE,
    MODEL_FILE,
    TRAINING_STATE_FILE,
    describe_model,
    load_model,
    load_training_state,
    read_meta,
    remap_state_dict,
    save_checkpoint,
)
from cervi_ray.config import load_config
from cervi_ray.models import build_model

BABY = load_config(Path(__file__).resolve().parents[1] / "configs" / "baby.yaml")

# Set by the payload below if torch.load ever unpickles it.
EXPLOITED = {"ran": False}


def _mark_exploited():
    EXPLOITED["ran"] = True


class PicklePayload:
    """An object whose unpickling calls a function: what a malicious checkpoint would carry."""

    def __reduce__(self):
        return (_mark_exploited, ())


@pytest.mark.parametrize("kind", ["teacher", "student"])
def test_round_trip_reproduces_outputs(tmp_path, kind):
    torch.manual_seed(0)
    model = build_model(kind, BABY.model, 3).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    save_checkpoint(tmp_path, model, describe_model(BABY, kind), optimizer=optimizer)

    loaded, meta = load_model(tmp_path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert meta["model_kind"] == kind
    assert meta["label_map"] == {"background": 0, "cytoplasm": 1, "nucleus": 2}
    assert meta["training_resolution"]["scale"] == BABY.data.scale
    assert load_training_state(tmp_path)["optimizer"]["param_groups"][0]["lr"] == 1e-3


def test_meta_records_resolution_and_config(tmp_path):
    config = BABY.model_copy(update={"data": BABY.data.model_copy(update={"mpp": 0.25})})
    meta = describe_model(config, "student")
    # images are resampled by 0.25, so each model pixel covers 0.25 / 0.25 = 1 micron
    assert meta["training_resolution"]["mpp"] == pytest.approx(1.0)
    assert meta["config"]["model"]["input_size"] == 64
    assert meta["code_version"].startswith("0.")


def test_pickled_code_is_refused(tmp_path):
    model = build_model("student", BABY.model, 3)
    save_checkpoint(tmp_path, model, describe_model(BABY, "student"))
    torch.save({"optimizer": PicklePayload()}, tmp_path / TRAINING_STATE_FILE)
    with pytest.raises(pickle.UnpicklingError):
        load_training_state(tmp_path)
    assert EXPLOITED["ran"] is False


def test_not_a_checkpoint_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a cervi_ray checkpoint"):
        load_model(tmp_path)


def test_format_version_mismatch(tmp_path):
    (tmp_path / META_FILE).write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        read_meta(tmp_path)


def test_weights_of_another_architecture(tmp_path):
    teacher = build_model("teacher", BABY.model, 3)
    meta = describe_model(BABY, "student")  # description says student, weights are a teacher's
    save_checkpoint(tmp_path, teacher, meta)
    with pytest.raises(ValueError, match="do not fit the student"):
        load_model(tmp_path)


def test_ddp_prefix_removed():
    state = {"module.a.weight": torch.ones(1), "module.b.bias": torch.zeros(1)}
    assert set(remap_state_dict(state, {})) == {"a.weight", "b.bias"}


def test_best_checkpoint_skips_incomplete_folders(baby_config):
    from cervi_ray.pipeline import best_checkpoint_of_run

    run = Path(baby_config.storage_path) / "baby-teacher"
    for name, dice, with_weights in (("checkpoint_a", 0.4, True), ("checkpoint_b", 0.9, False)):
        folder = run / name
        folder.mkdir(parents=True)
        (folder / META_FILE).write_text(json.dumps({"metrics": {"val_dice": dice}}))
        if with_weights:
            (folder / MODEL_FILE).write_bytes(b"weights")
    # checkpoint_b has the higher Dice but lost its weights, as an upload cut short by a lost node would.
    best = best_checkpoint_of_run(baby_config, "teacher")
    assert Path(best.path).name == "checkpoint_a"
