"""The datasets command backend: the dataset table and SHA-256 checks of downloaded files."""

import argparse
import hashlib
import io

import pytest

from cervi_ray.data import DATASETS, KINDS, list_datasets, verify_download
from cervi_ray.data import catalog


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cervi-ray datasets")
    catalog.add_arguments(parser)
    return parser.parse_args(argv)


def test_catalog_covers_every_fixed_kind():
    listed = [kind for dataset in DATASETS for kind in dataset.kinds]
    assert sorted(listed) == sorted(kind for kind in KINDS if kind != "folder")
    assert len(set(listed)) == len(listed)


def test_catalog_real_file_status():
    checked = {dataset.name: dataset.checked_on_real_files for dataset in DATASETS}
    assert checked == {
        "ISBI 2015 overlapping cervical cytology": True,
        "ISBI 2014 overlapping cervical cytology": True,
        "DTU/Herlev Pap smear database": False,
        "SIPaKMeD": False,
        "Cx22": False,
    }


def test_list_datasets_table():
    table = list_datasets()
    header, rule, *rows = table.splitlines()[: 2 + len(DATASETS)]
    assert header.split()[:2] == ["Dataset", "Kinds"]
    assert set(rule.replace(" ", "")) == {"-"}
    for dataset, row in zip(DATASETS, rows):
        assert row.startswith(dataset.name)
        assert dataset.download_page in row
        assert ("real files" if dataset.checked_on_real_files else "fixtures only") in row
    for dataset in DATASETS:
        assert dataset.download_page.startswith("https://")
        assert dataset.citation in table
        assert dataset.layout in table
    assert "Nothing is downloaded" in table


def test_verify_download_matches(tmp_path):
    path = tmp_path / "smear2005.zip"
    data = bytes(range(256)) * 10_000  # 2.5 MB, so the file is read in several chunks
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert verify_download(path) == f"SHA-256 of {path}: {expected} (no checksum given to compare with)"
    assert verify_download(path, expected) == f"SHA-256 of {path}: {expected} (matches)"
    # Upper-case hex and surrounding spaces, as copied from a web page, also match.
    assert verify_download(path, f" {expected.upper()} ").endswith("(matches)")


def test_verify_download_mismatch(tmp_path):
    path = tmp_path / "smear2005.zip"
    path.write_bytes(b"partial download")
    wrong = "0" * 64
    with pytest.raises(ValueError, match="download it again") as error:
        verify_download(path, wrong)
    message = str(error.value)
    assert hashlib.sha256(b"partial download").hexdigest() in message
    assert wrong in message
    assert str(path) in message


@pytest.mark.parametrize("checksum", ["abc", "g" * 64, "0" * 65])
def test_verify_download_malformed_checksum(tmp_path, checksum):
    path = tmp_path / "a.zip"
    path.write_bytes(b"x")
    with pytest.raises(ValueError, match="64 hexadecimal characters"):
        verify_download(path, checksum)


def test_verify_download_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found") as error:
        verify_download(tmp_path / "absent.zip", "0" * 64)
    assert str(tmp_path / "absent.zip") in str(error.value)
    with pytest.raises(ValueError, match="must be a file"):
        verify_download(tmp_path)


def test_run_prints_table():
    out = io.StringIO()
    catalog.run(parse([]), out)
    assert out.getvalue() == list_datasets() + "\n"


def test_run_verifies_file(tmp_path):
    path = tmp_path / "Cx22-Pair.zip"
    path.write_bytes(b"labels")
    digest = hashlib.sha256(b"labels").hexdigest()
    out = io.StringIO()
    catalog.run(parse(["--verify", str(path), "--sha256", digest]), out)
    assert out.getvalue() == f"SHA-256 of {path}: {digest} (matches)\n"


def test_run_checksum_needs_file():
    with pytest.raises(ValueError, match="--sha256 needs --verify FILE"):
        catalog.run(parse(["--sha256", "0" * 64]), io.StringIO())
