"""Manifests of the real sources and group-aware splits on synthetic and real manifests."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cervi_ray.data import (
    COLUMNS,
    KINDS,
    assign_split,
    build_manifest,
    list_source,
    load_or_create_splits,
    load_sample,
    make_splits,
    read_manifest,
    read_splits,
    write_manifest,
    write_splits,
)

REAL_SOURCES = [
    {"name": "isbi2015", "kind": "isbi2015", "path": "isbi2015/Training"},
    {"name": "train45", "kind": "isbi2014_train45", "path": "isbi2014/train45"},
    {"name": "test90", "kind": "isbi2014_test90", "path": "isbi2014/test90", "split": "test"},
    {"name": "edf", "kind": "isbi2014_edf_real", "path": "isbi2014/edf_real", "split": "test"},
]


@pytest.fixture(scope="module")
def real_manifest(data_root):
    return build_manifest(REAL_SOURCES, data_root)


def make_folder_source(root: Path, stems: list[str]) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for stem in stems:
        Image.fromarray(np.zeros((6, 7), np.uint8)).save(root / "images" / f"{stem}.png")
        Image.fromarray(np.full((6, 7), 255, np.uint8)).save(root / "masks" / f"{stem}.png")
    return root


# Manifests.


def test_real_manifest_rows(real_manifest):
    assert list(real_manifest.columns) == list(COLUMNS)
    counts = real_manifest.groupby("source").size().to_dict()
    assert counts == {"isbi2015": 8, "train45": 45, "test90": 90, "edf": 4}
    assert real_manifest["id"].is_unique
    # Groups are prefixed by the source name.
    assert all(g.startswith(f"{s}/") for g, s in zip(real_manifest["group"], real_manifest["source"]))
    pinned = real_manifest.groupby("source")["split"].unique().to_dict()
    assert [list(pinned[s]) for s in ("isbi2015", "train45", "test90", "edf")] == [[""], [""], ["test"], ["test"]]
    assert set(real_manifest.loc[real_manifest["source"] == "edf", "annotation"]) == {"nucleus"}
    assert all(Path(p).is_absolute() for p in real_manifest["image_path"])


def test_manifest_round_trip(real_manifest, tmp_path):
    path = tmp_path / "nested" / "manifest.parquet"
    write_manifest(real_manifest, path)
    restored = read_manifest(path)
    pd.testing.assert_frame_equal(restored, real_manifest)
    # A row read back is enough to load its sample.
    sample = load_sample(restored.iloc[8])
    assert sample.id == "train45/1"
    assert sample.image.shape == (512, 512, 3)


def test_read_manifest_missing_columns(tmp_path):
    path = tmp_path / "bad.parquet"
    pd.DataFrame({"id": ["a"]}).to_parquet(path)
    with pytest.raises(ValueError, match="lacks the columns") as error:
        read_manifest(path)
    assert str(path) in str(error.value)
    with pytest.raises(FileNotFoundError, match="absent.parquet"):
        read_manifest(tmp_path / "absent.parquet")


def test_folder_rows_store_value_map(tmp_path):
    root = make_folder_source(tmp_path / "src", ["a", "b"])
    manifest = build_manifest(
        [{"name": "mine", "kind": "folder", "path": str(root), "value_map": {0: 0, 255: 2}, "annotation": "nucleus"}],
        tmp_path / "elsewhere",  # an absolute path ignores root
    )
    assert manifest["value_map"].tolist() == ['{"0": 0, "255": 2}'] * 2
    write_manifest(manifest, tmp_path / "m.parquet")
    row = read_manifest(tmp_path / "m.parquet").iloc[0].to_dict()
    # Mask value 255 maps to nucleus using only the stored row.
    assert set(np.unique(load_sample(row).mask)) == {2}


def test_list_source_unknown_kind(tmp_path):
    with pytest.raises(ValueError, match="Unknown source kind 'herlev'") as error:
        list_source("herlev", tmp_path)
    for kind in KINDS:
        assert kind in str(error.value)


def test_list_source_missing_folder(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="EDF/frameNNN.png") as error:
        list_source("isbi2015", missing)
    assert str(missing) in str(error.value)
    with pytest.raises(FileNotFoundError, match="images/<stem>"):
        list_source("folder", tmp_path)


def test_list_source_empty_folder(tmp_path):
    make_folder_source(tmp_path / "src", [])
    with pytest.raises(ValueError, match="contains no images"):
        list_source("folder", tmp_path / "src")


def test_list_source_options_by_kind(data_root):
    path = data_root / "isbi2015/Training"
    with pytest.raises(ValueError, match="group_pattern applies only to kind 'folder'"):
        list_source("isbi2015", path, group_pattern=r"(\w+)")
    with pytest.raises(ValueError, match="annotated 'nucleus'"):
        list_source("isbi2014_edf_real", data_root / "isbi2014/edf_real", annotation="full")
    with pytest.raises(ValueError, match="Source name"):
        list_source("isbi2015", path, source="a/b")


def test_build_manifest_bad_sources(data_root):
    source = {"name": "isbi2015", "kind": "isbi2015", "path": "isbi2015/Training"}
    with pytest.raises(ValueError, match="appears twice"):
        build_manifest([source, source], data_root)
    with pytest.raises(ValueError, match="unknown keys \\['splt'\\]"):
        build_manifest([{**source, "splt": "test"}], data_root)
    with pytest.raises(ValueError, match="split must be 'auto' or one of"):
        build_manifest([{**source, "split": "holdout"}], data_root)
    with pytest.raises(ValueError, match="at least one source"):
        build_manifest([], data_root)


# make_splits.


def all_ids(splits: dict) -> set[str]:
    return set(splits["test"]) | set(splits["folds"][0]["train"]) | set(splits["folds"][0]["val"])


def test_splits_fractions_on_100_groups():
    ids = [f"s{i:03d}" for i in range(100)]
    splits = make_splits(ids, ids, seed=3)
    # 20 % go to test, and the remaining 80 groups of one sample give 5 folds of 16.
    assert len(splits["test"]) == 20
    assert [len(fold["val"]) for fold in splits["folds"]] == [16] * 5
    assert len(splits["folds"][0]["train"]) == 64
    assert splits["folds_count"] == 5
    assert all_ids(splits) == set(ids)
    for fold in splits["folds"]:
        assert fold["train"] == sorted(fold["train"])
        assert fold["val"] == sorted(fold["val"])
    # The five val sets partition the non-test ids.
    val_union = [i for fold in splits["folds"] for i in fold["val"]]
    assert sorted(val_union) == sorted(set(ids) - set(splits["test"]))


def test_splits_ignore_input_order():
    rng = np.random.default_rng(0)
    ids = [f"id{i}" for i in range(60)]
    groups = [f"g{i // 3}" for i in range(60)]
    strata = ["a" if i < 30 else "b" for i in range(60)]
    order = rng.permutation(60)
    shuffled = make_splits([ids[i] for i in order], [groups[i] for i in order], [strata[i] for i in order], seed=5)
    assert shuffled == make_splits(ids, groups, strata, seed=5)
    # A different seed gives a different test set.
    assert make_splits(ids, groups, strata, seed=6)["test"] != shuffled["test"]


def test_splits_keep_groups_together():
    rng = np.random.default_rng(1)
    ids = [f"id{i}" for i in range(200)]
    groups = [f"g{rng.integers(40)}" for _ in ids]  # 40 groups of uneven size
    group_of = dict(zip(ids, groups))
    splits = make_splits(ids, groups, seed=0)
    test_groups = {group_of[i] for i in splits["test"]}
    for fold in splits["folds"]:
        train_groups = {group_of[i] for i in fold["train"]}
        val_groups = {group_of[i] for i in fold["val"]}
        assert not train_groups & val_groups
        assert not train_groups & test_groups
        assert not val_groups & test_groups


def test_splits_represent_each_stratum():
    # A large source of 100 images and a small one of 6: each gets test and val members.
    ids = [f"big/{i}" for i in range(100)] + [f"small/{i}" for i in range(6)]
    strata = ["big"] * 100 + ["small"] * 6
    splits = make_splits(ids, ids, strata, seed=0)
    small_test = [i for i in splits["test"] if i.startswith("small/")]
    assert len(small_test) == 1  # round(0.2 * 6) = 1
    for fold in splits["folds"]:
        assert any(i.startswith("small/") for i in fold["val"])
        assert any(i.startswith("small/") for i in fold["train"])
    # Splitting per stratum leaves the big source's split as if it were alone.
    alone = make_splits(ids[:100], ids[:100], seed=0)
    assert [i for i in splits["test"] if i.startswith("big/")] == alone["test"]


def test_splits_greedy_fold_sizes():
    # Groups of 3, 2, 1 and 1 into 2 folds without test: a(3) -> fold 0, b(2) -> fold 1,
    # then the two singles go to the smaller fold each time, giving sizes 4 and 3.
    ids = ["a1", "a2", "a3", "b1", "b2", "c1", "d1"]
    groups = ["a", "a", "a", "b", "b", "c", "d"]
    splits = make_splits(ids, groups, test_fraction=0.0, folds=2)
    assert splits["test"] == []
    assert [len(fold["val"]) for fold in splits["folds"]] == [4, 3]
    assert {"a1", "a2", "a3"} <= set(splits["folds"][0]["val"])
    assert {"b1", "b2"} <= set(splits["folds"][1]["val"])


def test_splits_small_stratum_keeps_training_data():
    # One group: nothing goes to test. Two groups: one goes to test.
    assert make_splits(["x1", "x2"], ["x", "x"])["test"] == []
    assert len(make_splits(["x", "y"], ["x", "y"])["test"]) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"folds": 1}, "folds must be an integer >= 2"),
        ({"test_fraction": 1.0}, r"test_fraction must be in \[0, 1\)"),
        ({"test_fraction": -0.1}, r"test_fraction must be in \[0, 1\)"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"strata": ["a"]}, "equal lengths"),
    ],
)
def test_splits_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_splits(["a", "b"], ["a", "b"], **kwargs)


def test_splits_invalid_ids_and_groups():
    with pytest.raises(ValueError, match="ids must be unique"):
        make_splits(["a", "a"], ["g", "h"])
    with pytest.raises(ValueError, match="spans strata"):
        make_splits(["a", "b"], ["g", "g"], ["s1", "s2"])


# Persisted splits.


def synthetic_manifest(count: int, pinned: int = 0) -> pd.DataFrame:
    rows = [
        {"id": f"src/{i}", "source": "src", "group": f"src/{i // 2}", "split": ""}
        for i in range(count)
    ]
    rows += [{"id": f"eval/{i}", "source": "eval", "group": f"eval/{i}", "split": "test"} for i in range(pinned)]
    return pd.DataFrame(rows)


def test_splits_file_round_trip(tmp_path):
    splits = make_splits([f"i{n}" for n in range(10)], [f"i{n}" for n in range(10)])
    path = tmp_path / "splits.json"
    write_splits(splits, path)
    assert read_splits(path) == splits
    assert json.loads(path.read_text())["folds_count"] == 5


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "invalid JSON"),
        ('{"version": 1}', "missing keys"),
        (
            '{"version": 1, "seed": 0, "test_fraction": 0.2, "folds_count": 2, "test": ["a"], '
            '"folds": [{"train": ["a"], "val": ["b"]}, {"train": ["b"], "val": ["a"]}]}',
            "more than one of train, val and test",
        ),
        (
            '{"version": 1, "seed": 0, "test_fraction": 0.2, "folds_count": 3, "test": [], '
            '"folds": [{"train": ["a"], "val": ["b"]}]}',
            "list of 3 folds",
        ),
    ],
)
def test_read_splits_malformed(tmp_path, content, message):
    path = tmp_path / "splits.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        read_splits(path)
    assert str(path) in str(error.value)


def test_load_or_create_splits_reuses_file(tmp_path):
    manifest = synthetic_manifest(40, pinned=3)
    path = tmp_path / "runs" / "splits.json"
    created = load_or_create_splits(path, manifest, seed=0, test_fraction=0.2, folds=5)
    assert path.is_file()
    # Pinned rows are not split.
    assert all_ids(created) == {f"src/{i}" for i in range(40)}

    # Swap folds 0 and 1 by hand. A reused file is returned as stored, not made again.
    edited = json.loads(path.read_text())
    edited["folds"][0], edited["folds"][1] = edited["folds"][1], edited["folds"][0]
    path.write_text(json.dumps(edited))
    reused = load_or_create_splits(path, manifest, seed=0, test_fraction=0.2, folds=5)
    assert reused == edited
    assert reused != created


def test_load_or_create_splits_mismatch(tmp_path):
    path = tmp_path / "splits.json"
    load_or_create_splits(path, synthetic_manifest(40), seed=0, test_fraction=0.2, folds=5)
    # Two more images in the manifest than in the file.
    with pytest.raises(ValueError, match="2 manifest ids are missing") as error:
        load_or_create_splits(path, synthetic_manifest(42), seed=0, test_fraction=0.2, folds=5)
    assert str(path) in str(error.value)
    assert "src/40" in str(error.value)
    assert "Delete the file" in str(error.value)
    with pytest.raises(ValueError, match="0 manifest ids are missing .* 4 ids in it are not"):
        load_or_create_splits(path, synthetic_manifest(36), seed=0, test_fraction=0.2, folds=5)
    with pytest.raises(ValueError, match="made with seed=0, but 1 was requested"):
        load_or_create_splits(path, synthetic_manifest(40), seed=1, test_fraction=0.2, folds=5)
    with pytest.raises(ValueError, match="folds_count=5, but 3"):
        load_or_create_splits(path, synthetic_manifest(40), seed=0, test_fraction=0.2, folds=3)


def test_load_or_create_splits_group_change(tmp_path):
    path = tmp_path / "splits.json"
    manifest = synthetic_manifest(40)
    load_or_create_splits(path, manifest, seed=0, test_fraction=0.2, folds=5)
    # Merging all images into one group puts that group in train and test at once.
    regrouped = manifest.assign(group="src/all")
    with pytest.raises(ValueError, match="groups changed"):
        load_or_create_splits(path, regrouped, seed=0, test_fraction=0.2, folds=5)


def test_assign_split(tmp_path):
    manifest = synthetic_manifest(40, pinned=3)
    splits = load_or_create_splits(tmp_path / "s.json", manifest, seed=0, test_fraction=0.2, folds=5)
    assigned = assign_split(manifest, splits, fold=2)
    assert manifest["split"].tolist().count("") == 40  # the input is left unchanged
    split_of = dict(zip(assigned["id"], assigned["split"]))
    assert {split_of[i] for i in splits["test"]} == {"test"}
    assert {split_of[i] for i in splits["folds"][2]["val"]} == {"val"}
    assert {split_of[i] for i in splits["folds"][2]["train"]} == {"train"}
    assert {split_of[f"eval/{i}"] for i in range(3)} == {"test"}
    with pytest.raises(ValueError, match="fold must be an integer in 0..4, got 5"):
        assign_split(manifest, splits, fold=5)
    with pytest.raises(ValueError, match="not in the splits"):
        assign_split(synthetic_manifest(42), splits)


def test_real_manifest_splits(real_manifest, tmp_path):
    splits = load_or_create_splits(tmp_path / "splits.json", real_manifest, seed=0, test_fraction=0.2, folds=5)
    assigned = assign_split(real_manifest, splits, fold=0)
    by_source = assigned.groupby(["source", "split"]).size().to_dict()
    # isbi2015 gives round(0.2 * 8) = 2 test frames, train45 gives 9, and pinned sets stay test.
    assert by_source[("isbi2015", "test")] == 2
    assert by_source[("train45", "test")] == 9
    assert by_source[("test90", "test")] == 90
    assert by_source[("edf", "test")] == 4
    assert by_source[("isbi2015", "val")] >= 1
    assert by_source[("train45", "val")] >= 1
