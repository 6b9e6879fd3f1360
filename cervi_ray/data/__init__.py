"""Data layer: readers for the cytology data sets, manifests, splits, augmentation and datasets."""

from cervi_ray.data.augment import RandomOcclusion, build_train_augmentation, seed_augmentation
from cervi_ray.data.catalog import DATASETS, DatasetInfo, list_datasets, verify_download
from cervi_ray.data.dataset import (
    IMAGE_MEAN,
    IMAGE_STD,
    SegmentationDataset,
    load_eval_pair,
    rescale,
    to_tensor,
)
from cervi_ray.data.labels import (
    ANNOTATIONS,
    BACKGROUND,
    CLASS_NAMES,
    CYTOPLASM,
    NUCLEUS,
    NUM_CLASSES,
    Annotation,
)
from cervi_ray.data.manifest import (
    COLUMN_DEFAULTS,
    COLUMNS,
    KINDS,
    build_manifest,
    list_source,
    load_sample,
    read_manifest,
    write_manifest,
)
from cervi_ray.data.readers_herlev import DEFAULT_COLOUR_MAP, colours_to_labels, parse_colour_map
from cervi_ray.data.readers_isbi import nuclei_from_outlines, semantic_mask
from cervi_ray.data.readers_sipakmed import read_contour, rasterise_contour
from cervi_ray.data.sample import Sample, load_image, load_label_image, read_image_size
from cervi_ray.data.splits import (
    assign_split,
    load_or_create_splits,
    make_splits,
    read_splits,
    write_splits,
)

__all__ = [
    "ANNOTATIONS",
    "BACKGROUND",
    "CLASS_NAMES",
    "COLUMNS",
    "COLUMN_DEFAULTS",
    "CYTOPLASM",
    "DATASETS",
    "DEFAULT_COLOUR_MAP",
    "IMAGE_MEAN",
    "IMAGE_STD",
    "KINDS",
    "NUCLEUS",
    "NUM_CLASSES",
    "Annotation",
    "DatasetInfo",
    "RandomOcclusion",
    "Sample",
    "SegmentationDataset",
    "assign_split",
    "build_manifest",
    "build_train_augmentation",
    "colours_to_labels",
    "list_datasets",
    "list_source",
    "load_eval_pair",
    "load_image",
    "load_label_image",
    "load_or_create_splits",
    "load_sample",
    "make_splits",
    "nuclei_from_outlines",
    "parse_colour_map",
    "rasterise_contour",
    "read_contour",
    "read_image_size",
    "read_manifest",
    "read_splits",
    "rescale",
    "seed_augmentation",
    "semantic_mask",
    "to_tensor",
    "verify_download",
    "write_manifest",
    "write_splits",
]
