"""Group-aware train/val/test splits with k folds, persisted as JSON and reused by later runs.

Like nnU-Net's splits_final.json, the file is written once and every later run with the same
manifest reads it, so all folds and all runs see the same test set.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

SPLITS_VERSION = 1


# Making splits.


def _check_split_arguments(seed: int, test_fraction: float, folds: int) -> None:
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise ValueError(f"folds must be an integer >= 2, got {folds!r}")
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")


def _split_stratum(
    group_sizes: dict[str, int], seed: int, test_fraction: float, folds: int
) -> tuple[list[str], list[list[str]]]:
    """Return (test groups, groups of each fold) for the groups of one stratum."""
    groups = sorted(group_sizes)
    order = np.random.default_rng(seed).permutation(len(groups))
    shuffled = [groups[i] for i in order]
    sample_count = sum(group_sizes.values())

    # Test: groups in shuffled order until the test sample count reaches the target. At least one
    # group when test_fraction > 0, but never every group, so training keeps data of this stratum.
    target = round(test_fraction * sample_count)
    test_groups: list[str] = []
    test_count = 0
    while len(test_groups) < len(shuffled) - 1 and (
        test_count < target or (test_fraction > 0 and not test_groups)
    ):
        group = shuffled[len(test_groups)]
        test_groups.append(group)
        test_count += group_sizes[group]
    remaining = shuffled[len(test_groups) :]

    # Folds: largest group first to the fold with the fewest samples (ties: lowest fold index).
    # The sort is stable, so equal-sized groups keep their shuffled order.
    remaining.sort(key=lambda g: -group_sizes[g])
    fold_groups: list[list[str]] = [[] for _ in range(folds)]
    fold_counts = [0] * folds
    for group in remaining:
        fold = int(np.argmin(fold_counts))  # argmin returns the first of equal minima
        fold_groups[fold].append(group)
        fold_counts[fold] += group_sizes[group]
    return test_groups, fold_groups


def make_splits(
    ids: Sequence[str],
    groups: Sequence[str],
    strata: Sequence[str] | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    folds: int = 5,
) -> dict[str, Any]:
    """Split ids into a test set and `folds` train/val folds, keeping each group in one split.

    Each stratum (for example each source) is split on its own with a fresh generator seeded
    with `seed`, and the results are merged. So every stratum with enough groups has test and
    val members, and adding a stratum leaves the split of the others unchanged. The result does
    not depend on the input order, and all lists are sorted.
    """
    _check_split_arguments(seed, test_fraction, folds)
    strata = [""] * len(ids) if strata is None else strata
    if not len(ids) == len(groups) == len(strata):
        raise ValueError(
            f"ids, groups and strata must have equal lengths, got {len(ids)}, {len(groups)} and {len(strata)}"
        )
    duplicated = [i for i, count in Counter(ids).items() if count > 1]
    if duplicated:
        raise ValueError(f"ids must be unique, got {len(duplicated)} duplicates, e.g. {sorted(duplicated)[:5]}")

    ids_of_group: dict[str, list[str]] = defaultdict(list)
    stratum_of_group: dict[str, str] = {}
    for sample_id, group, stratum in zip(ids, groups, strata):
        ids_of_group[group].append(sample_id)
        if stratum_of_group.setdefault(group, stratum) != stratum:
            raise ValueError(
                f"Group {group!r} spans strata {stratum_of_group[group]!r} and {stratum!r}. A group must "
                f"lie in one stratum, or it could land in two splits."
            )

    groups_of_stratum: dict[str, dict[str, int]] = defaultdict(dict)
    for group, stratum in stratum_of_group.items():
        groups_of_stratum[stratum][group] = len(ids_of_group[group])

    test_groups: list[str] = []
    val_groups: list[list[str]] = [[] for _ in range(folds)]
    for stratum in sorted(groups_of_stratum):
        group_sizes = groups_of_stratum[stratum]
        if len(group_sizes) < folds + (1 if test_fraction > 0 else 0):
            logger.warning(
                "Stratum %r has only %d groups for %d folds%s, so some splits get none of its samples",
                stratum, len(group_sizes), folds, " and a test set" if test_fraction > 0 else "",
            )
        stratum_test, stratum_folds = _split_stratum(group_sizes, seed, test_fraction, folds)
        test_groups += stratum_test
        for fold in range(folds):
            val_groups[fold] += stratum_folds[fold]

    def ids_in(selected: list[str]) -> list[str]:
        return sorted(sample_id for group in selected for sample_id in ids_of_group[group])

    test_ids = ids_in(test_groups)
    development = sorted(set(ids) - set(test_ids))
    fold_splits = []
    for fold in range(folds):
        val_ids = ids_in(val_groups[fold])
        val_set = set(val_ids)
        fold_splits.append({"train": [i for i in development if i not in val_set], "val": val_ids})
    return {
        "version": SPLITS_VERSION,
        "seed": int(seed),
        "test_fraction": float(test_fraction),
        "folds_count": int(folds),
        "test": test_ids,
        "folds": fold_splits,
    }


# Persisting splits.


def _validate_splits(splits: Any, where: str) -> None:
    """Raise ValueError unless `splits` has the structure make_splits returns."""

    def invalid(reason: str) -> ValueError:
        return ValueError(f"{where} is not a valid splits file: {reason}. Delete it to create it again.")

    if not isinstance(splits, dict):
        raise invalid(f"expected a JSON object, got {type(splits).__name__}")
    missing = [key for key in ("version", "seed", "test_fraction", "folds_count", "test", "folds") if key not in splits]
    if missing:
        raise invalid(f"missing keys {missing}")
    if splits["version"] != SPLITS_VERSION:
        raise invalid(f"version must be {SPLITS_VERSION}, got {splits['version']!r}")
    try:
        _check_split_arguments(splits["seed"], splits["test_fraction"], splits["folds_count"])
    except (TypeError, ValueError) as e:
        raise invalid(str(e)) from e

    def is_id_list(value: Any) -> bool:
        return isinstance(value, list) and all(isinstance(i, str) for i in value)

    folds = splits["folds"]
    if not isinstance(folds, list) or len(folds) != splits["folds_count"]:
        raise invalid(f"'folds' must be a list of {splits['folds_count']} folds")
    if not is_id_list(splits["test"]):
        raise invalid("'test' must be a list of id strings")
    test = set(splits["test"])
    development: set[str] | None = None
    for index, fold in enumerate(folds):
        if not isinstance(fold, dict) or not is_id_list(fold.get("train")) or not is_id_list(fold.get("val")):
            raise invalid(f"fold {index} must be an object with 'train' and 'val' lists of id strings")
        train, val = set(fold["train"]), set(fold["val"])
        if train & val or (train | val) & test:
            raise invalid(f"fold {index} has ids in more than one of train, val and test")
        if development is not None and train | val != development:
            raise invalid(f"fold {index} covers other ids than fold 0")
        development = train | val


def write_splits(splits: dict[str, Any], path: str | Path) -> None:
    """Write splits as indented JSON, atomically, creating parent folders."""
    path = Path(path)
    _validate_splits(splits, "The splits to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a reader never sees a half-written file.
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as handle:
        json.dump(splits, handle, indent=2)
        handle.write("\n")
    os.replace(handle.name, path)
    logger.debug("Wrote splits to %s", path)


def read_splits(path: str | Path) -> dict[str, Any]:
    """Read and validate a splits file written by write_splits."""
    path = Path(path)
    try:
        splits = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not a valid splits file: invalid JSON ({e}). Delete it to create it again.") from e
    _validate_splits(splits, str(path))
    return splits


# Splits of a manifest.


def _unpinned(manifest_df: pd.DataFrame) -> pd.DataFrame:
    return manifest_df[manifest_df["split"] == ""]


def _check_matches_manifest(splits: dict[str, Any], path: Path, unpinned: pd.DataFrame, settings: dict[str, Any]) -> None:
    for key, requested in settings.items():
        if splits[key] != requested:
            raise ValueError(
                f"Splits file {path} was made with {key}={splits[key]!r}, but {requested!r} was requested. "
                f"Delete the file to make new splits, or choose another path."
            )

    stored = set(splits["test"]) | set(splits["folds"][0]["train"]) | set(splits["folds"][0]["val"])
    current = set(unpinned["id"])
    missing, extra = sorted(current - stored), sorted(stored - current)
    if missing or extra:
        raise ValueError(
            f"Splits file {path} does not match the manifest: {len(missing)} manifest ids are missing "
            f"from it (e.g. {missing[:3]}) and {len(extra)} ids in it are not in the manifest "
            f"(e.g. {extra[:3]}). Delete the file to make new splits, or choose another path."
        )

    # Groups may have changed since the file was written (e.g. a new group_pattern).
    group_of = dict(zip(unpinned["id"], unpinned["group"]))
    split_of_group: dict[str, str] = {}
    for split_name, split_ids in (("test", splits["test"]), ("val", splits["folds"][0]["val"])):
        for sample_id in split_ids:
            split_of_group[group_of[sample_id]] = split_name
    for sample_id in splits["folds"][0]["train"]:
        other = split_of_group.get(group_of[sample_id])
        if other is not None:
            raise ValueError(
                f"Splits file {path} puts group {group_of[sample_id]!r} in both train and {other}, so the "
                f"manifest's groups changed since it was written. Delete the file or choose another path."
            )


def load_or_create_splits(
    path: str | Path, manifest_df: pd.DataFrame, seed: int, test_fraction: float, folds: int
) -> dict[str, Any]:
    """Read the splits file at `path`, or make and write it from the manifest's unpinned rows.

    Rows with a pinned split (non-empty "split") are left out. Unpinned rows are split with
    strata = source and groups = group. An existing file must match the manifest's unpinned
    ids and the requested seed, test_fraction and folds, or a ValueError names what differs.
    """
    path = Path(path)
    _check_split_arguments(seed, test_fraction, folds)
    unpinned = _unpinned(manifest_df)
    if path.exists():
        splits = read_splits(path)
        settings = {"seed": seed, "test_fraction": float(test_fraction), "folds_count": folds}
        _check_matches_manifest(splits, path, unpinned, settings)
        logger.info("Reusing splits from %s", path)
        return splits

    splits = make_splits(
        unpinned["id"].tolist(),
        unpinned["group"].tolist(),
        strata=unpinned["source"].tolist(),
        seed=seed,
        test_fraction=test_fraction,
        folds=folds,
    )
    write_splits(splits, path)
    logger.info(
        "Created splits at %s: %d test ids, %d folds over %d ids", path, len(splits["test"]), folds, len(unpinned)
    )
    return splits


def assign_split(manifest_df: pd.DataFrame, splits: dict[str, Any], fold: int = 0) -> pd.DataFrame:
    """Return a copy of the manifest with "split" set from `fold`. Pinned rows keep theirs."""
    folds_count = len(splits["folds"])
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or not 0 <= fold < folds_count:
        raise ValueError(f"fold must be an integer in 0..{folds_count - 1}, got {fold!r}")

    split_of_id = {sample_id: "test" for sample_id in splits["test"]}
    split_of_id.update({sample_id: "train" for sample_id in splits["folds"][fold]["train"]})
    split_of_id.update({sample_id: "val" for sample_id in splits["folds"][fold]["val"]})

    result = manifest_df.copy()
    unpinned = result["split"] == ""
    absent = sorted(set(result.loc[unpinned, "id"]) - set(split_of_id))
    if absent:
        raise ValueError(
            f"{len(absent)} unpinned manifest ids are not in the splits, e.g. {absent[:3]}. Make the "
            f"splits from this manifest with load_or_create_splits."
        )
    result.loc[unpinned, "split"] = result.loc[unpinned, "id"].map(split_of_id)
    return result
