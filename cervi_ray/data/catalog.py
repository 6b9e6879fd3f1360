"""The datasets cervi_ray reads, where their authors publish them, and checksums of downloads.

Backend of the `datasets` command: it lists each dataset with its reader kinds, folder layout,
citation and download page, and computes the SHA-256 of an archive the user downloaded. It
downloads nothing, because every dataset here needs a manual download, some after accepting
terms of use.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from cervi_ray.data import readers_cx22, readers_herlev, readers_isbi, readers_sipakmed

logger = logging.getLogger(__name__)

_CHUNK_BYTES = 1 << 20  # 1 MiB reads keep memory flat for archives of several GB
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


@dataclass(frozen=True)
class DatasetInfo:
    """One dataset: what it is, where to get it and how far its reader has been checked."""

    name: str
    kinds: tuple[str, ...]  # source kinds of the reader (config data.sources[].kind)
    description: str
    citation: str
    download_page: str  # as published by the dataset's authors or challenge organisers
    layout: str  # the folder a source points at, as the reader expects it
    checked_on_real_files: bool  # False: tested only on fixtures written from the documented format
    note: str = ""


_ISBI_CITATION = (
    "Lu, Carneiro, Bradley et al., IEEE Trans. Image Processing 24(4), 2015; "
    "Lu et al., IEEE J. Biomedical and Health Informatics 21(2), 2017"
)

DATASETS: tuple[DatasetInfo, ...] = (
    DatasetInfo(
        name="ISBI 2015 overlapping cervical cytology",
        kinds=("isbi2015",),
        description="Real EDF Pap smear images, 1024 x 1024 grey, with per-cell cytoplasm and nucleus masks.",
        citation=_ISBI_CITATION,
        # NOTE: this address comes from third-party references to the challenge and is unverified.
        download_page="https://cs.adelaide.edu.au/~zhi/isbi15_challenge/",
        layout=readers_isbi.LAYOUTS["isbi2015"],
        checked_on_real_files=True,
    ),
    DatasetInfo(
        name="ISBI 2014 overlapping cervical cytology",
        kinds=("isbi2014_train45", "isbi2014_test90", "isbi2014_edf_real"),
        description=(
            "512 x 512 grey images composited from real cells (45 train, 90 test) with per-cell masks, "
            "and real EDF images with nucleus outlines."
        ),
        citation=_ISBI_CITATION,
        download_page="https://cs.adelaide.edu.au/~carneiro/isbi14_challenge/",
        layout="; ".join(
            f"{kind}: {readers_isbi.LAYOUTS[kind]}"
            for kind in ("isbi2014_train45", "isbi2014_test90", "isbi2014_edf_real")
        ),
        checked_on_real_files=True,
    ),
    DatasetInfo(
        name="DTU/Herlev Pap smear database",
        kinds=(readers_herlev.KIND,),
        description=(
            "917 single-cell colour images in 7 classes (3 normal, 4 abnormal) with colour-coded segmentations."
        ),
        citation=(
            "Jantzen, Norup, Dounias, Bjerregaard, Pap-smear Benchmark Data For Pattern Classification, "
            "NiSIS 2005"
        ),
        download_page="https://mde-lab.aegean.gr/index.php/downloads/",
        layout=f"smear2005/New database pictures/: {readers_herlev.LAYOUT}",
        checked_on_real_files=False,
        note="The segmentation colours are assumed. Set colour_map if loading reports unknown colours.",
    ),
    DatasetInfo(
        name="SIPaKMeD",
        kinds=(readers_sipakmed.KIND,),
        description=(
            "966 colour cluster images with 4,049 cells in 5 classes, nucleus and cytoplasm contours per cell."
        ),
        citation=(
            "Plissiti, Dimitrakopoulos, Sfikas, Nikou, Krikoni, Charchanti, SIPaKMeD: A new dataset for "
            "feature and image based classification of normal and pathological cervical cells in Pap smear "
            "images, ICIP 2018"
        ),
        download_page="https://www.cs.uoi.gr/~marina/sipakmed.html",
        layout=readers_sipakmed.LAYOUT,
        checked_on_real_files=False,
    ),
    DatasetInfo(
        name="Cx22",
        kinds=(readers_cx22.KIND,),
        description="1,320 cervical cytology images with 14,946 cytoplasm and nucleus instances.",
        citation=(
            "Liu et al., Cx22: A new publicly available dataset for deep learning-based segmentation of "
            "cervical cytology images, Computers in Biology and Medicine 150:106194, 2022"
        ),
        download_page="https://github.com/LGQ330/Cx22",
        layout=f"Cx22-Pair/ (or Cx22-Multi-Train/, Cx22-Multi-Test/): {readers_cx22.LAYOUT}",
        checked_on_real_files=False,
        note=(
            "The archives contain labels only. Run generator/ImageDataGenerator.m in MATLAB on the CCEDD "
            "images to write ImageDataSet.mat. MATLAB v7.3 (HDF5) and v7 files are both read directly. "
            "Non-commercial use only."
        ),
    ),
)


# Listing.


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def list_datasets() -> str:
    """Return a table of DATASETS followed by each dataset's layout, citation and notes."""
    header = ("Dataset", "Kinds", "Reader checked on", "Download page")
    rows = [
        (
            dataset.name,
            ", ".join(dataset.kinds),
            "real files" if dataset.checked_on_real_files else "fixtures only",
            dataset.download_page,
        )
        for dataset in DATASETS
    ]

    details = []
    for dataset in DATASETS:
        details.append(f"\n{dataset.name}: {dataset.description}")
        details.append(f"  layout: {dataset.layout}")
        details.append(f"  cite:   {dataset.citation}")
        if dataset.note:
            details.append(f"  note:   {dataset.note}")
    footer = "\nNothing is downloaded: get each archive from its page, then check it with --verify FILE --sha256 HEX."
    return "\n".join([_table(header, rows), *details, footer])


# Checksums.


def sha256_of_file(path: str | Path) -> str:
    """Compute the SHA-256 of a file as lower-case hex, reading it in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def verify_download(path: str | Path, sha256: str | None = None) -> str:
    """Compute the SHA-256 of a downloaded archive and compare it with `sha256` when given.

    Returns a one-line report. Raises FileNotFoundError for a missing file and ValueError for a
    folder, a malformed checksum or a mismatch.
    """
    path = Path(path)
    if sha256 is not None and not _SHA256_HEX.fullmatch(sha256.strip()):
        raise ValueError(f"--sha256 must be 64 hexadecimal characters, got {sha256!r} ({len(sha256)} characters)")
    if not path.exists():
        raise FileNotFoundError(f"Downloaded file {path} not found. Check the path or download it again.")
    if not path.is_file():
        raise ValueError(f"{path} must be a file (the downloaded archive), got a folder or special file.")

    actual = sha256_of_file(path)
    logger.info("SHA-256 of %s: %s", path, actual)
    if sha256 is None:
        return f"SHA-256 of {path}: {actual} (no checksum given to compare with)"
    expected = sha256.strip().lower()
    if actual != expected:
        raise ValueError(
            f"SHA-256 of {path} is {actual}, expected {expected}. The download is incomplete or a different "
            f"file: download it again from the dataset's page (see `cervi-ray datasets`)."
        )
    return f"SHA-256 of {path}: {actual} (matches)"


# Command.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of the `datasets` command to `parser`."""
    parser.add_argument(
        "--verify", metavar="FILE", help="downloaded archive to compute the SHA-256 of (nothing is downloaded)"
    )
    parser.add_argument(
        "--sha256", metavar="HEX", help="expected SHA-256 of FILE as 64 hexadecimal characters (fails on a mismatch)"
    )


def run(args: argparse.Namespace, out: TextIO | None = None) -> None:
    """Write the dataset table, or the checksum report of --verify FILE, to `out` (default stdout)."""
    out = sys.stdout if out is None else out
    if args.verify is None:
        if args.sha256 is not None:
            raise ValueError("--sha256 needs --verify FILE: give the downloaded archive to check.")
        out.write(list_datasets() + "\n")
        return
    out.write(verify_download(args.verify, args.sha256) + "\n")
