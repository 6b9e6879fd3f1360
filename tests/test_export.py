"""Model bundles and ONNX export: files and hashes, exact reloads, ONNX Runtime against PyTorch, guards."""

import argparse
import functools
import hashlib
import importlib.util
import json
import tarfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from cervi_ray.checkpoint import describe_model, load_model, read_meta, save_checkpoint
from cervi_ray.config import load_config
from cervi_ray.data.dataset import IMAGE_MEAN, IMAGE_STD
from cervi_ray.export import OnnxMismatchError, build_bundle, build_bundle_from_uri, check_onnx, verify_bundle
from cervi_ray.export import bundle as bundle_module
from cervi_ray.export import command
from cervi_ray.export.onnx_export import (
    MAX_ABS_DIFF,
    MIN_ARGMAX_AGREEMENT,
    apply_view,
    invert_view,
)
from cervi_ray.models import build_student
from cervi_ray.models.reshape import parameter_shapes
from cervi_ray.pruning.structured import prune_student_structured
from cervi_ray.tta import ALL_TRANSFORMS, apply_transform, predict_with_tta

REPOSITORY = Path(__file__).resolve().parents[1]
BABY = load_config(REPOSITORY / "configs" / "baby.yaml")
BUNDLE_FILES = {
    "model.safetensors", "meta.json", "config.yaml", "labels.json", "preprocessing.json",
    "metrics.json", "MODEL_CARD.md",
}
ONNX_FILES = {"model.onnx", "model_tta.onnx"}


# Helpers and fixtures


def baby_student(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_student(BABY.model, 3).eval()


def write_checkpoint(folder: Path, model: torch.nn.Module | None = None, meta: dict | None = None) -> Path:
    model = model if model is not None else baby_student()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # training state the bundle must leave out
    return save_checkpoint(folder, model, meta or describe_model(BABY, "student"), optimizer=optimizer)


def images(height: int, width: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


@functools.cache
def onnx_session(path: Path) -> onnxruntime.InferenceSession:
    # One session per file: creating the TTA graph's session takes seconds.
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_onnx(path: Path, x: torch.Tensor) -> np.ndarray:
    return onnx_session(path).run(None, {"image": x.numpy()})[0]


def assert_matches_pytorch(actual: np.ndarray, expected: torch.Tensor, label: str) -> None:
    expected = expected.numpy()
    assert actual.shape == expected.shape, f"{label}: ONNX shape {actual.shape}, PyTorch {expected.shape}"
    max_difference = float(np.abs(actual - expected).max())
    agreement = float((actual.argmax(axis=1) == expected.argmax(axis=1)).mean())
    assert max_difference <= MAX_ABS_DIFF, (
        f"{label}: max abs difference {max_difference:.3g} between ONNX Runtime and PyTorch "
        f"exceeds {MAX_ABS_DIFF:g}"
    )
    assert agreement >= MIN_ARGMAX_AGREEMENT, (
        f"{label}: argmax agrees on {100 * agreement:.3f} % of pixels (max abs difference "
        f"{max_difference:.3g}), below {100 * MIN_ARGMAX_AGREEMENT:g} %"
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def evaluate_metrics(model_kind: str = "student") -> dict:
    """A metrics.json as `cervi-ray evaluate` writes it, cut down to one set and one image."""
    pixel = {
        "nucleus": {"dice": 0.75, "sensitivity": 0.7, "tp": 10, "fp": 2, "fn": 3, "tn": 100},
        "cytoplasm": {"dice": 0.9, "sensitivity": 0.95, "tp": 50, "fp": 5, "fn": 2, "tn": 60},
        "cell": {"dice": 0.92, "sensitivity": 0.96, "tp": 60, "fp": 4, "fn": 2, "tn": 50},
    }
    per_image = {"nucleus": {"dice": {"mean": 0.74, "ci_low": 0.7, "ci_high": 0.78, "n": 1}}}
    return {
        "sets": {"isbi2015": {"pixel": pixel, "per_image": per_image, "images": [{"id": "isbi2015/frame001"}]}},
        "complexity": {"parameters": 842667},
        "meta": {"model_kind": model_kind, "label_mode": "full", "code_version": "0.1.0"},
    }


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("checkpoint") / "ckpt")


@pytest.fixture(scope="module")
def onnx_bundle(checkpoint, tmp_path_factory) -> Path:
    """A bundle with model.onnx and model_tta.onnx (all eight views) and a .tar.gz archive."""
    output = tmp_path_factory.mktemp("bundles") / "baby-student"
    build_bundle(checkpoint, output, archive=True)
    return output


@pytest.fixture(scope="module")
def bundle_model(onnx_bundle) -> torch.nn.Module:
    model, _ = load_model(onnx_bundle)
    return model


# TTA views inside the ONNX graph


def test_views_match_tta_module():
    x = torch.randn(2, 3, 5, 7)
    for name in ALL_TRANSFORMS:
        assert torch.equal(apply_view(x, name), apply_transform(x, name)), name
        assert torch.equal(invert_view(apply_transform(x, name), name), x), name


# Bundle layout, hashes and exact reloads


def test_bundle_has_every_file(onnx_bundle):
    names = {path.name for path in onnx_bundle.iterdir()}
    assert names == BUNDLE_FILES | ONNX_FILES
    meta = read_meta(onnx_bundle)
    assert meta["bundle"]["left_out"] == ["training_state.pt"]  # no optimizer state in bundles
    assert not list(onnx_bundle.parent.glob(".*partial*"))  # staging folder renamed away


def test_bundle_hashes_match(onnx_bundle):
    files = read_meta(onnx_bundle)["bundle"]["files"]
    assert set(files) == (BUNDLE_FILES | ONNX_FILES) - {"meta.json"}
    for name, record in files.items():
        assert record["sha256"] == sha256(onnx_bundle / name), name
        assert record["bytes"] == (onnx_bundle / name).stat().st_size, name
    assert verify_bundle(onnx_bundle)["files"] == files


def test_verify_bundle_detects_change(checkpoint, tmp_path):
    output = tmp_path / "bundle"
    build_bundle(checkpoint, output, onnx=False)
    (output / "labels.json").write_text("{}")
    with pytest.raises(ValueError, match="labels.json differs"):
        verify_bundle(output)
    (output / "config.yaml").unlink()
    with pytest.raises(ValueError, match="config.yaml is missing"):
        verify_bundle(output)


def test_verify_bundle_rejects_checkpoint(checkpoint):
    with pytest.raises(ValueError, match="not a bundle"):
        verify_bundle(checkpoint)


def test_bundle_reloads_exactly(checkpoint, onnx_bundle, bundle_model):
    original, _ = load_model(checkpoint)
    assert read_meta(onnx_bundle)["model_kind"] == "student"
    for x in (images(64, 64), images(70, 50, batch=1)):
        with torch.no_grad():
            assert torch.equal(original(x), bundle_model(x)), f"outputs differ for input {tuple(x.shape)}"
    assert (onnx_bundle / "model.safetensors").read_bytes() == (checkpoint / "model.safetensors").read_bytes()


def test_bundle_descriptions(onnx_bundle):
    labels = json.loads((onnx_bundle / "labels.json").read_text())
    assert labels["label_map"] == {"background": 0, "cytoplasm": 1, "nucleus": 2}
    assert labels["class_names"] == ["background", "cytoplasm", "nucleus"]

    preprocessing = json.loads((onnx_bundle / "preprocessing.json").read_text())
    assert preprocessing["normalisation"]["mean"] == list(IMAGE_MEAN)
    assert preprocessing["normalisation"]["std"] == list(IMAGE_STD)
    assert preprocessing["input"]["channel_order"] == "RGB"
    assert preprocessing["resolution"]["scale"] == BABY.data.scale
    assert preprocessing["resolution"]["magnification"] == BABY.data.magnification * BABY.data.scale
    assert preprocessing["size"]["padding_multiple"] == 32
    assert preprocessing["tta"]["transforms"] == list(ALL_TRANSFORMS)

    metrics = json.loads((onnx_bundle / "metrics.json").read_text())
    assert metrics["test_metrics_supplied"] is False
    assert "cervi-ray evaluate" in metrics["note"]

    assert load_config(onnx_bundle / "config.yaml").model_dump(mode="json") == read_meta(onnx_bundle)["config"]
    card = (onnx_bundle / "MODEL_CARD.md").read_text()
    for heading in ("## Intended use", "## Training data", "## Metrics", "## Limitations", "## How to load"):
        assert heading in card, heading
    assert "not a diagnostic device" in card
    assert "No test metrics were supplied" in card


def test_archive_holds_bundle(onnx_bundle):
    archive = onnx_bundle.with_name(onnx_bundle.name + ".tar.gz")
    with tarfile.open(archive) as tar:
        names = {Path(name).name for name in tar.getnames() if name != onnx_bundle.name}
        assert all(name.startswith(onnx_bundle.name) for name in tar.getnames())
    assert names == BUNDLE_FILES | ONNX_FILES


# ONNX Runtime against PyTorch


# The export itself checks a third, odd size (101 x 83): test_export_records_onnx_check.
@pytest.mark.parametrize("height, width", [(64, 64), (96, 128)])
def test_onnx_matches_pytorch(onnx_bundle, bundle_model, height, width):
    x = images(height, width)
    with torch.no_grad():
        expected = bundle_model(x)
    assert_matches_pytorch(run_onnx(onnx_bundle / "model.onnx", x), expected, f"model.onnx at {height} x {width}")


@pytest.mark.parametrize("height, width", [(64, 64), (96, 128)])
def test_tta_onnx_matches_predict_with_tta(onnx_bundle, bundle_model, height, width):
    x = images(height, width, batch=1, seed=1)
    expected = predict_with_tta(bundle_model, x, ALL_TRANSFORMS).probs
    actual = run_onnx(onnx_bundle / "model_tta.onnx", x)
    assert_matches_pytorch(actual, expected, f"model_tta.onnx at {height} x {width}")
    assert np.allclose(actual.sum(axis=1), 1.0, atol=1e-5)  # averaged probabilities sum to 1


def test_onnx_signature(onnx_bundle):
    session = onnx_session(onnx_bundle / "model.onnx")
    (image,) = session.get_inputs()
    (logits,) = session.get_outputs()
    assert (image.name, image.shape) == ("image", ["batch", 3, "height", "width"])
    assert (logits.name, logits.shape) == ("logits", ["batch", 3, "height", "width"])
    metadata = session.get_modelmeta().custom_metadata_map
    assert json.loads(metadata["cervi_ray.label_map"]) == {"background": 0, "cytoplasm": 1, "nucleus": 2}


def test_export_records_onnx_check(onnx_bundle):
    onnx = read_meta(onnx_bundle)["bundle"]["onnx"]
    assert onnx["exporter"].startswith("torch.onnx.export(dynamo=False)")
    for name in ONNX_FILES:
        check = onnx["files"][name]["check"]
        assert check["passed"] is True, name
        assert check["max_abs_diff"] <= MAX_ABS_DIFF, f"{name}: max abs difference {check['max_abs_diff']:.3g}"
        assert check["input_shapes"] == [[2, 3, 64, 64], [1, 3, 101, 83]]


def test_onnx_mismatch_reports_max_difference(tmp_path):
    # An identity graph checked against a reference shifted by 0.01 plays the part of an
    # exporter that gets a value wrong.
    value_info = [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["batch", 3, "height", "width"])
                  for name in ("image", "logits")]
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["image"], ["logits"])], "identity", value_info[:1], value_info[1:]
    )
    path = tmp_path / "identity.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(path))

    small = images(8, 8) / 10  # values below 1, so the allowed difference is 1e-4 itself
    assert check_onnx(path, lambda x: x, [small]).max_abs_diff == 0.0
    with pytest.raises(OnnxMismatchError, match=r"max abs difference of logits 0\.01 \(allowed 0\.0001 for"):
        check_onnx(path, lambda x: x + 0.01, [small])

    # The allowed difference grows with the output: values up to about 300 allow about 0.03.
    large = images(8, 8) * 100
    check = check_onnx(path, lambda x: x + 0.01, [large])
    assert check.max_abs_diff_allowed == pytest.approx(1e-4 * check.output_max_abs)
    assert check.passed


# Structurally pruned student


def test_pruned_student_exports_and_reloads(tmp_path):
    model = baby_student(seed=3)
    summary = prune_student_structured(model, 0.5)
    meta = describe_model(BABY, "student")
    meta["pruned_shapes"] = parameter_shapes(model)
    meta["pruning"] = summary
    write_checkpoint(tmp_path / "ckpt", model, meta)

    output = tmp_path / "bundle"
    result = build_bundle(tmp_path / "ckpt", output, tta_onnx=False)
    assert result.onnx["files"]["model.onnx"]["check"]["passed"] is True
    assert not (output / "model_tta.onnx").exists()

    reloaded, reloaded_meta = load_model(output)
    assert reloaded_meta["pruned_shapes"] == parameter_shapes(model)
    x = images(64, 64)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(expected, reloaded(x))
    assert_matches_pytorch(run_onnx(output / "model.onnx", x), expected, "pruned model.onnx at 64 x 64")
    assert "keep_ratio 0.5" in (output / "MODEL_CARD.md").read_text()


# Existing output, --force and failures


def test_existing_bundle_needs_force(checkpoint, tmp_path):
    output = tmp_path / "bundle"
    output.mkdir()
    (output / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--force"):
        build_bundle(checkpoint, output, onnx=False)
    assert (output / "notes.txt").read_text() == "keep me"

    build_bundle(checkpoint, output, onnx=False, force=True)
    assert {path.name for path in output.iterdir()} == BUNDLE_FILES
    assert [path.name for path in tmp_path.iterdir()] == ["bundle"]  # no staging or replaced folders


def test_empty_output_folder_is_used(checkpoint, tmp_path):
    output = tmp_path / "bundle"
    output.mkdir()
    build_bundle(checkpoint, output, onnx=False)
    assert {path.name for path in output.iterdir()} == BUNDLE_FILES


def test_existing_archive_needs_force(checkpoint, tmp_path):
    (tmp_path / "bundle.tar.gz").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="archive .* already exists"):
        build_bundle(checkpoint, tmp_path / "bundle", onnx=False, archive=True)
    assert not (tmp_path / "bundle").exists()
    build_bundle(checkpoint, tmp_path / "bundle", onnx=False, archive=True, force=True)
    assert tarfile.is_tarfile(tmp_path / "bundle.tar.gz")


def failing_export(*args, **kwargs):
    raise OnnxMismatchError("model.onnx: max abs difference of logits 1 (allowed 0.0001)")


def test_failed_export_writes_nothing(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(bundle_module, "export_and_check", failing_export)
    with pytest.raises(OnnxMismatchError):
        build_bundle(checkpoint, tmp_path / "bundle", archive=True)
    assert list(tmp_path.iterdir()) == []


def test_failed_export_keeps_old_bundle(checkpoint, tmp_path, monkeypatch):
    output = tmp_path / "bundle"
    build_bundle(checkpoint, output, onnx=False)
    before = {path.name: sha256(path) for path in output.iterdir()}

    monkeypatch.setattr(bundle_module, "export_and_check", failing_export)
    with pytest.raises(OnnxMismatchError):
        build_bundle(checkpoint, output, force=True)
    assert {path.name: sha256(path) for path in output.iterdir()} == before
    assert [path.name for path in tmp_path.iterdir()] == ["bundle"]


# Metrics from `cervi-ray evaluate`


def test_metrics_recorded(checkpoint, tmp_path):
    evaluate_dir = tmp_path / "eval" / "model"
    evaluate_dir.mkdir(parents=True)
    (evaluate_dir / "metrics.json").write_text(json.dumps(evaluate_metrics()))
    output = tmp_path / "bundle"
    build_bundle(checkpoint, output, onnx=False, metrics=evaluate_dir)  # the folder is accepted too

    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["test_metrics_supplied"] is True
    assert metrics["split"] == "test"
    assert metrics["source_file"] == str(evaluate_dir / "metrics.json")
    assert metrics["sets"]["isbi2015"]["pixel"]["nucleus"]["dice"] == 0.75
    assert read_meta(output)["bundle"]["test_metrics_supplied"] is True
    card = (output / "MODEL_CARD.md").read_text()
    assert "| isbi2015 | 1 | 0.750 | 0.900 | 0.920 | 0.740 (0.700 to 0.780) |" in card


def test_metrics_of_other_model_rejected(checkpoint, tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(evaluate_metrics(model_kind="teacher")))
    with pytest.raises(ValueError, match="model_kind 'teacher'"):
        build_bundle(checkpoint, tmp_path / "bundle", onnx=False, metrics=path)
    assert not (tmp_path / "bundle").exists()


@pytest.mark.parametrize("content, message", [
    ("not json", "not valid JSON"),
    (json.dumps({"pixel": {}}), "no 'sets' entry"),
])
def test_invalid_metrics_file(checkpoint, tmp_path, content, message):
    path = tmp_path / "metrics.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        build_bundle(checkpoint, tmp_path / "bundle", onnx=False, metrics=path)


def test_missing_metrics_file(checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics file .* not found"):
        build_bundle(checkpoint, tmp_path / "bundle", onnx=False, metrics=tmp_path / "absent.json")


# Invalid checkpoints


def test_not_a_checkpoint_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is not a cervi_ray checkpoint: meta.json is missing"):
        build_bundle(tmp_path / "empty", tmp_path / "bundle")


def test_missing_meta_json(checkpoint, tmp_path):
    folder = tmp_path / "weights-only"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match="meta.json is missing"):
        build_bundle(folder, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_missing_weights(checkpoint, tmp_path):
    folder = tmp_path / "meta-only"
    folder.mkdir()
    (folder / "meta.json").write_text((checkpoint / "meta.json").read_text())
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        build_bundle(folder, tmp_path / "bundle")


def test_missing_checkpoint_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint folder .*absent not found"):
        build_bundle(tmp_path / "absent", tmp_path / "bundle")


def test_checkpoint_path_is_file(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="is a file. Pass the folder"):
        build_bundle(checkpoint / "model.safetensors", tmp_path / "bundle")


def test_meta_without_description(checkpoint, tmp_path):
    folder = tmp_path / "bare"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes())
    (folder / "meta.json").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(ValueError, match="lacks model_kind"):
        build_bundle(folder, tmp_path / "bundle")


def test_output_containing_checkpoint_rejected(checkpoint):
    with pytest.raises(ValueError, match="would contain the checkpoint"):
        build_bundle(checkpoint, checkpoint, force=True)
    with pytest.raises(ValueError, match="would contain the checkpoint"):
        build_bundle(checkpoint, checkpoint.parent, force=True)
    assert (checkpoint / "model.safetensors").is_file()


# Command and job


def parse_export(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser.parse_args(argv)


def test_command_prints_bundle(checkpoint, tmp_path, capsys):
    output = tmp_path / "bundle"
    command.run(BABY, parse_export(["--checkpoint", str(checkpoint), "--output", str(output), "--no-onnx"]))
    printed = capsys.readouterr().out
    assert f"bundle: {output}" in printed
    assert "model.safetensors" in printed
    with pytest.raises(ValueError, match="--force"):  # the command line reports ValueError as an error
        command.run(BABY, parse_export(["--checkpoint", str(checkpoint), "--output", str(output), "--no-onnx"]))


def test_command_rejects_unknown_view(capsys):
    with pytest.raises(SystemExit):
        parse_export(["--checkpoint", "c", "--output", "o", "--tta", "rot45"])
    assert "invalid choice: 'rot45'" in capsys.readouterr().err


def test_local_uri_goes_to_build_bundle(checkpoint, tmp_path):
    result = build_bundle_from_uri(str(checkpoint), tmp_path / "bundle", onnx=False)
    assert read_meta(result.folder)["bundle"]["source_checkpoint"] == str(checkpoint)


def test_s3_checkpoint_exported(checkpoint, tmp_path, s3_server):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket="models")
    for path in checkpoint.iterdir():
        client.upload_file(str(path), "models", f"runs/ckpt/{path.name}")

    result = build_bundle_from_uri("s3://models/runs/ckpt", tmp_path / "bundle", s3_server, onnx=False)
    assert read_meta(result.folder)["bundle"]["source_checkpoint"] == "s3://models/runs/ckpt"
    assert (result.folder / "model.safetensors").read_bytes() == (checkpoint / "model.safetensors").read_bytes()


def test_job_file_imports():
    spec = importlib.util.spec_from_file_location("export_job", REPOSITORY / "jobs" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # runs the imports only; main needs `if __name__ == "__main__"`
    assert callable(module.main)
