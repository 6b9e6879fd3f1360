"""Config loading: every shipped profile validates, bad files fail with the key and the fix."""

from pathlib import Path

import pytest

from cervi_ray.config import ConfigError, config_from_dict, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MINIMAL = {"data": {"sources": [{"name": "a", "kind": "folder", "path": "a"}]}}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    config = load_config(path)
    assert config.data.sources


def test_defaults_fill_missing_sections():
    config = config_from_dict(MINIMAL)
    assert config.distill.temperature == 4.0  # the method's T
    assert (config.distill.soft_weight, config.distill.feature_weight, config.distill.seg_weight) == (0.5, 0.3, 0.2)
    assert config.data.split.test_fraction == 0.2
    assert config.data.split.folds == 5


def test_unknown_key_names_its_path():
    tree = {**MINIMAL, "teacher_train": {"epoch": 3}}
    with pytest.raises(ConfigError, match=r"teacher_train\.epoch: Extra inputs are not permitted"):
        config_from_dict(tree)


def test_wrong_type_names_field_and_value():
    tree = {**MINIMAL, "scaling": {"num_workers": "two"}}
    with pytest.raises(ConfigError, match=r"scaling\.num_workers: .*integer.*'two'"):
        config_from_dict(tree)


def test_unknown_source_kind_lists_choices():
    tree = {"data": {"sources": [{"name": "a", "kind": "herlev", "path": "a"}]}}
    with pytest.raises(ConfigError, match="isbi2015"):
        config_from_dict(tree)


def test_fold_must_be_below_folds():
    tree = {"data": {**MINIMAL["data"], "split": {"folds": 3, "fold": 3}}}
    with pytest.raises(ConfigError, match="fold must be below folds"):
        config_from_dict(tree)


def test_crop_and_resize_exclusive():
    tree = {"data": {**MINIMAL["data"], "crop_size": 64, "resize_to": 64}}
    with pytest.raises(ConfigError, match="crop_size or resize_to"):
        config_from_dict(tree)


def test_overrides_parse_yaml_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  sources: [{name: a, kind: folder, path: a}]\n")
    config = load_config(path, ["teacher_train.epochs=3", "scaling.use_gpu=true", "student_train.lr=1e-3"])
    assert config.teacher_train.epochs == 3
    assert config.scaling.use_gpu is True
    assert config.student_train.lr == pytest.approx(1e-3)


def test_bad_override_format(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  sources: [{name: a, kind: folder, path: a}]\n")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(path, ["teacher_train.epochs"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(scalar)


def test_data_root_missing_says_how_to_set(tmp_path, monkeypatch):
    monkeypatch.setenv("CERVI_RAY_DATA", str(tmp_path / "nowhere"))
    config = config_from_dict(MINIMAL)
    with pytest.raises(ConfigError, match="CERVI_RAY_DATA"):
        config.data_root()


def test_data_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CERVI_RAY_DATA", str(tmp_path))
    assert config_from_dict(MINIMAL).data_root() == tmp_path.resolve()


def test_run_name_rejects_path_separators():
    tree = {**MINIMAL, "run": {"name": "../escape"}}
    with pytest.raises(ConfigError, match=r"run\.name"):
        config_from_dict(tree)


def test_output_dir_made_absolute(tmp_path, monkeypatch):
    # Ray workers run in folders of their own, so the driver fixes the folder before shipping the config.
    monkeypatch.chdir(tmp_path)
    config = load_config(CONFIGS / "baby.yaml")
    assert config.run.output_dir == str(tmp_path / "runs")
    assert config_from_dict(config.model_dump(mode="json")).run.output_dir == str(tmp_path / "runs")


def test_output_dir_in_ray_working_copy_rejected(tmp_path, monkeypatch):
    # The driver of a job submitted with --working-dir runs in Ray's temporary copy of that folder.
    working_copy = tmp_path / "working_dir_files" / "_ray_pkg_0123"
    working_copy.mkdir(parents=True)
    monkeypatch.chdir(working_copy)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}}')

    with pytest.raises(ConfigError) as raised:
        load_config(CONFIGS / "baby.yaml")
    message = str(raised.value)
    assert f"run.output_dir {working_copy / 'runs'} is inside {working_copy}" in message
    assert "--set run.output_dir=" in message

    outside_copy = load_config(CONFIGS / "baby.yaml", [f"run.output_dir={tmp_path / 'results'}"])
    assert outside_copy.run.output_dir == str(tmp_path / "results")


def test_output_dir_relative_without_ray_job(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {}}')  # a job without working_dir

    assert load_config(CONFIGS / "baby.yaml").run.output_dir == str(tmp_path / "runs")
