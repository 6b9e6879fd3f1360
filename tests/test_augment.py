"""Training augmentation keeps masks valid and aligned with the image."""

import numpy as np
import pytest

from cervi_ray.data import NUCLEUS, RandomOcclusion, build_train_augmentation, list_source, load_sample


@pytest.fixture(scope="module")
def real_crops(data_root):
    """A 256 x 256 crop of a real ISBI 2015 frame (labels 0, 1, 2) and of an EDF image (0, 2)."""
    frame = load_sample(list_source("isbi2015", data_root / "isbi2015/Training").iloc[0])
    edf = load_sample(list_source("isbi2014_edf_real", data_root / "isbi2014/edf_real").iloc[0])
    crops = []
    for sample in (frame, edf):
        # Centre the crop on the first nucleus so every label of the image appears in it.
        rows, cols = np.nonzero(sample.mask == NUCLEUS)
        top = int(np.clip(rows[0] - 128, 0, 1024 - 256))
        left = int(np.clip(cols[0] - 128, 0, 1024 - 256))
        crops.append((sample.image[top : top + 256, left : left + 256], sample.mask[top : top + 256, left : left + 256]))
    return crops


def test_real_crops_fixture(real_crops):
    assert set(np.unique(real_crops[0][1])) == {0, 1, 2}
    assert set(np.unique(real_crops[1][1])) == {0, 2}


def test_no_new_label_values(real_crops):
    augment = build_train_augmentation(rotate_p=0.9, occlusion_p=0.9, seed=0)
    for image, mask in real_crops:
        labels = set(np.unique(mask))
        for _ in range(100):
            out = augment(image=image, mask=mask)
            # Bilinear resampling of {0, 2} would create 1, but nearest must not.
            assert set(np.unique(out["mask"])) <= labels
            assert out["mask"].dtype == mask.dtype
            assert out["image"].shape == image.shape
            assert out["image"].dtype == np.uint8


def mask_image(mask: np.ndarray) -> np.ndarray:
    """Build an (H, W, 3) image whose grey level is 100 times the label."""
    return np.repeat((mask * 100).astype(np.uint8)[:, :, None], 3, axis=2)


def test_flips_keep_alignment(real_crops):
    _, mask = real_crops[0]
    image = mask_image(mask)
    augment = build_train_augmentation(rotate_p=0, occlusion_p=0, jitter_p=0, seed=1)
    flips_seen = set()
    for _ in range(40):
        out = augment(image=image, mask=mask)
        assert np.array_equal(out["image"][:, :, 0], out["mask"].astype(np.uint8) * 100)
        for name, flipped in (("h", mask[:, ::-1]), ("v", mask[::-1]), ("hv", mask[::-1, ::-1]), ("", mask)):
            if np.array_equal(out["mask"], flipped):
                flips_seen.add(name)
    # All four flip combinations occur with p = 0.5 each in 40 draws.
    assert flips_seen == {"", "h", "v", "hv"}


def test_rotation_keeps_mask_values(real_crops):
    _, mask = real_crops[1]  # labels {0, 2}
    image = mask_image(mask)
    augment = build_train_augmentation(hflip_p=0, vflip_p=0, rotate_p=1, occlusion_p=0, jitter_p=0, seed=2)
    changed = 0
    for _ in range(20):
        out = augment(image=image, mask=mask)
        assert set(np.unique(out["mask"])) <= {0, 2}
        changed += not np.array_equal(out["mask"], mask)
        # Image (bilinear) and mask (nearest) rotate together: they disagree only along edges.
        agreement = np.mean(np.abs(out["image"][:, :, 0].astype(int) - out["mask"].astype(int) * 100) < 50)
        assert agreement > 0.97
    assert changed >= 19  # an angle of exactly 0 is possible but rare


def test_occlusion_leaves_mask(real_crops):
    image, mask = real_crops[0]
    augment = build_train_augmentation(hflip_p=0, vflip_p=0, rotate_p=0, occlusion_p=1, jitter_p=0, seed=3)
    changed = 0
    for _ in range(20):
        out = augment(image=image, mask=mask)
        assert np.array_equal(out["mask"], mask)
        changed += not np.array_equal(out["image"], image)
    assert changed == 20


def test_occlusion_shapes_and_sizes():
    occlusion = RandomOcclusion(max_count=1, max_size=0.25, p=1.0)
    occlusion.set_random_seed(4)
    image = np.full((200, 200, 3), 7, np.uint8)
    areas = []
    for _ in range(50):
        out = occlusion(image=image)["image"]
        painted = np.any(out != 7, axis=2)
        areas.append(painted.mean())
        # One grey value for all channels keeps grey images grey.
        assert np.array_equal(out[:, :, 0], out[:, :, 1])
    # One shape fits in a circle of diameter 0.25 * 200 = 50 pixels: area <= pi * 25 ** 2 = 1963.
    assert max(areas) <= (np.pi * 25**2 + 200) / 200**2  # plus a margin for rasterised edges
    assert len(set(np.round(areas, 3))) > 10  # sizes vary


def test_jitter_changes_image_only(real_crops):
    image, mask = real_crops[0]
    augment = build_train_augmentation(hflip_p=0, vflip_p=0, rotate_p=0, occlusion_p=0, jitter_p=1, seed=5)
    out = augment(image=image, mask=mask)
    assert np.array_equal(out["mask"], mask)
    assert not np.array_equal(out["image"], image)


def test_seed_reproducible(real_crops):
    image, mask = real_crops[0]
    first = build_train_augmentation(seed=11)
    second = build_train_augmentation(seed=11)
    other = build_train_augmentation(seed=12)
    differs = False
    for _ in range(10):
        a, b, c = first(image=image, mask=mask), second(image=image, mask=mask), other(image=image, mask=mask)
        assert np.array_equal(a["image"], b["image"])
        assert np.array_equal(a["mask"], b["mask"])
        differs |= not np.array_equal(a["image"], c["image"])
    assert differs


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hflip_p": 1.5}, r"hflip_p must be a probability in \[0, 1\]"),
        ({"rotate_limit": 200}, r"rotate_limit must be in \[0, 180\]"),
        ({"brightness": -0.1}, r"brightness must be in \[0, 1\]"),
        ({"occlusion_max_count": 0}, "max_count must be an integer >= 1"),
        ({"occlusion_max_size": 1.5}, r"max_size must be in \(0, 1\]"),
        ({"seed": -3}, "seed must be None or an integer >= 0"),
    ],
)
def test_invalid_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_train_augmentation(**kwargs)
