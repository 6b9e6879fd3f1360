"""SegmentationDataset, rescale, to_tensor and load_eval_pair on real and generated rows."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cervi_ray.data import (
    IMAGE_MEAN,
    IMAGE_STD,
    NUCLEUS,
    SegmentationDataset,
    build_train_augmentation,
    list_source,
    load_eval_pair,
    rescale,
    to_tensor,
)


@pytest.fixture(scope="module")
def isbi2015_rows(data_root):
    # Two real frames are enough and keep the tests fast.
    return list_source("isbi2015", data_root / "isbi2015/Training").iloc[:2]


@pytest.fixture(scope="module")
def edf_rows(data_root):
    return list_source("isbi2014_edf_real", data_root / "isbi2014/edf_real").iloc[:1]


def make_spot_source(root: Path, size=(200, 160), spot=(150, 20)) -> list[dict]:
    """Write one image whose mask has a single 4 x 4 nucleus at `spot` (row, col)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    height, width = size
    image = np.tile(np.arange(width, dtype=np.uint8), (height, 1))  # grey level = column
    mask = np.zeros(size, np.uint8)
    mask[spot[0] : spot[0] + 4, spot[1] : spot[1] + 4] = 2
    Image.fromarray(image).save(root / "images" / "spot.png")
    Image.fromarray(mask).save(root / "masks" / "spot.png")
    return list_source("folder", root).to_dict("records")


# to_tensor and rescale.


def test_to_tensor_values():
    image = np.zeros((2, 3, 3), np.uint8)
    image[0, 1] = (255, 0, 128)
    tensor = to_tensor(image)
    assert tensor.shape == (3, 2, 3)
    assert tensor.dtype == torch.float32
    # (1 - 0.485) / 0.229 for a red value of 255, and (0 - 0.456) / 0.224 for green 0.
    assert tensor[0, 0, 1].item() == pytest.approx((1 - IMAGE_MEAN[0]) / IMAGE_STD[0])
    assert tensor[1, 0, 1].item() == pytest.approx(-IMAGE_MEAN[1] / IMAGE_STD[1])
    assert tensor[2, 0, 1].item() == pytest.approx((128 / 255 - IMAGE_MEAN[2]) / IMAGE_STD[2])
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        to_tensor(image.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        to_tensor(image[:, :, 0])


def test_rescale_shapes_and_labels():
    image = np.random.default_rng(0).integers(0, 256, (100, 60, 3), dtype=np.uint8)
    mask = np.zeros((100, 60), np.uint8)
    mask[:50] = 2
    mask[50:, :30] = 1
    same_image, same_mask = rescale(image, mask, 1.0)
    assert same_image is image
    assert same_mask is mask
    small_image, small_mask = rescale(image, mask, 0.5)
    assert small_image.shape == (50, 30, 3)
    assert small_mask.shape == (50, 30)
    assert set(np.unique(small_mask)) == {0, 1, 2}  # nearest neighbour: no blended labels
    large_image, large_mask = rescale(image, mask, 1.5)
    assert large_image.shape == (150, 90, 3)
    assert set(np.unique(large_mask)) == {0, 1, 2}
    # A uniform image stays uniform under area averaging.
    assert np.all(rescale(np.full((8, 8, 3), 9, np.uint8), None, 0.5)[0] == 9)
    with pytest.raises(ValueError, match="scale must be > 0"):
        rescale(image, mask, 0)


# SegmentationDataset.


def test_dataset_items(isbi2015_rows):
    dataset = SegmentationDataset(isbi2015_rows, scale=0.25, crop_size=128, repeats=3)
    assert len(dataset) == 6  # 2 images x 3 repeats
    item = dataset[4]
    assert item["image"].shape == (3, 128, 128)
    assert item["image"].dtype == torch.float32
    assert item["mask"].shape == (128, 128)
    assert item["mask"].dtype == torch.int64
    assert item["id"] == "isbi2015/frame004"  # index 4 is image 4 % 2 = 0
    assert set(item["mask"].unique().tolist()) <= {0, 1, 2}
    # Whole images at scale 0.25: 1024 -> 256.
    whole = SegmentationDataset(isbi2015_rows.to_dict("records"), scale=0.25)
    assert whole[1]["image"].shape == (3, 256, 256)
    assert set(whole[1]["mask"].unique().tolist()) == {0, 1, 2}
    with pytest.raises(IndexError):
        whole[2]


def test_dataset_resize(isbi2015_rows):
    dataset = SegmentationDataset(isbi2015_rows, scale=0.25, resize_to=96)
    item = dataset[0]
    assert item["image"].shape == (3, 96, 96)
    assert set(item["mask"].unique().tolist()) <= {0, 1, 2}
    with pytest.raises(ValueError, match="mutually exclusive"):
        SegmentationDataset(isbi2015_rows, crop_size=64, resize_to=64)


def test_crop_pads_small_images(tmp_path):
    rows = make_spot_source(tmp_path / "src", size=(40, 30), spot=(10, 10))
    dataset = SegmentationDataset(rows, crop_size=64, foreground_crop_p=0.0)
    item = dataset[0]
    assert item["image"].shape == (3, 64, 64)
    assert item["mask"].shape == (64, 64)
    # Reflect padding repeats the nucleus: the 4 x 4 spot appears more than once.
    assert int((item["mask"] == 2).sum()) > 16


def test_foreground_crops(tmp_path):
    rows = make_spot_source(tmp_path / "src")
    centred = SegmentationDataset(rows, crop_size=32, foreground_crop_p=1.0, repeats=30)
    # Every crop centred on the 4 x 4 spot contains at least one of its pixels.
    assert all((centred[i]["mask"] == 2).any() for i in range(30))
    uniform = SegmentationDataset(rows, crop_size=32, foreground_crop_p=0.0, repeats=30)
    hits = sum(bool((uniform[i]["mask"] == 2).any()) for i in range(30))
    # A uniform 32 x 32 crop of 200 x 160 meets the spot with probability about 0.04.
    assert hits < 10


def test_crop_seed_and_epoch(tmp_path):
    rows = make_spot_source(tmp_path / "src")

    def crops(dataset):
        return [dataset[i]["image"] for i in range(5)]

    first = SegmentationDataset(rows, crop_size=32, seed=7, repeats=5)
    second = SegmentationDataset(rows, crop_size=32, seed=7, repeats=5)
    assert all(torch.equal(a, b) for a, b in zip(crops(first), crops(second)))
    epoch0 = crops(first)
    first.set_epoch(1)
    second.set_epoch(1)
    epoch1 = crops(first)
    assert all(torch.equal(a, b) for a, b in zip(epoch1, crops(second)))
    assert not all(torch.equal(a, b) for a, b in zip(epoch0, epoch1))
    with pytest.raises(ValueError, match="epoch must be an integer >= 0"):
        first.set_epoch(-1)


def test_workers_draw_different_crops(tmp_path):
    rows = make_spot_source(tmp_path / "src")
    dataset = SegmentationDataset(rows, crop_size=32, foreground_crop_p=0.0, repeats=4)
    loader = DataLoader(dataset, batch_size=1, num_workers=2)
    images = [batch["image"][0] for batch in loader]
    # Items 0 and 1 are the first draws of workers 0 and 1. A shared seed would repeat the crop.
    assert not torch.equal(images[0], images[1])


def test_augment_applied(tmp_path):
    rows = make_spot_source(tmp_path / "src")
    flip = build_train_augmentation(hflip_p=1, vflip_p=0, rotate_p=0, occlusion_p=0, jitter_p=0)
    plain = SegmentationDataset(rows)[0]
    flipped = SegmentationDataset(rows, augment=flip)[0]
    assert torch.equal(flipped["image"], plain["image"].flip(-1))
    assert torch.equal(flipped["mask"], plain["mask"].flip(-1))


def test_label_modes(isbi2015_rows, edf_rows):
    nucleus_only = SegmentationDataset(isbi2015_rows, scale=0.25, label_mode="nucleus")
    full = SegmentationDataset(isbi2015_rows, scale=0.25)
    # Nucleus mode: 1 where the full mask is nucleus (2), else 0.
    assert torch.equal(nucleus_only[0]["mask"], (full[0]["mask"] == NUCLEUS).long())
    edf = SegmentationDataset(edf_rows, scale=0.25, label_mode="nucleus")
    assert set(edf[0]["mask"].unique().tolist()) == {0, 1}
    with pytest.raises(ValueError, match="isbi2014_edf_real/EDF000 has only nuclei annotated") as error:
        SegmentationDataset(edf_rows, label_mode="full")
    assert "Pin its source to the test split" in str(error.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scale": 0}, "scale must be > 0"),
        ({"crop_size": 0}, "crop_size must be None or an integer >= 1"),
        ({"repeats": 0}, "repeats must be an integer >= 1"),
        ({"label_mode": "cells"}, "label_mode must be one of"),
        ({"foreground_crop_p": 2}, r"foreground_crop_p must be in \[0, 1\]"),
        ({"seed": -1}, "seed must be an integer >= 0"),
    ],
)
def test_dataset_invalid_arguments(tmp_path, kwargs, message):
    rows = make_spot_source(tmp_path / "src")
    with pytest.raises(ValueError, match=message):
        SegmentationDataset(rows, **kwargs)


def test_dataset_needs_rows():
    with pytest.raises(ValueError, match="at least one manifest row"):
        SegmentationDataset([])


# load_eval_pair.


def test_eval_pair_keeps_full_resolution_mask(isbi2015_rows):
    image, mask, sample = load_eval_pair(isbi2015_rows.iloc[0], scale=0.5)
    assert image.shape == (512, 512, 3)
    assert image.dtype == np.uint8
    assert mask.shape == (1024, 1024)
    assert mask is sample.mask
    assert sample.id == "isbi2015/frame004"
