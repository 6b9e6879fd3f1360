"""The slides of an archive: a folder or S3 prefix, or a manifest file, and safe slide ids.

Slide ids name the output files, so they are reduced to letters, digits, ".", "_" and "-".
They never start with "." or "_", because Parquet readers skip such files as hidden. They
never contain a path separator, which keeps every output inside the output prefix.
"""

import hashlib
import io
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pandas as pd

from cervi_ray.scoring.slides import S3_SCHEME, SLIDE_EXTENSIONS, SlideStorage

logger = logging.getLogger(__name__)

MAX_ID_LENGTH = 120
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class SlideSource:
    slide_id: str  # safe id, used in output file names
    uri: str  # absolute local path or s3://bucket/key
    name: str  # the name the id came from: path relative to the input, or the manifest's id


def safe_slide_id(name: str) -> str:
    """Turn a file name or relative path into an id that is safe as a single file name.

    Path separators become "__", every other run of unsafe characters becomes "_", and leading
    dots, underscores and dashes are dropped, so "..", "." and "/x" cannot escape a folder.
    Ids longer than MAX_ID_LENGTH are cut and end in a hash of the full name.
    """
    joined = "__".join(part for part in re.split(r"[/\\]+", name) if part)
    safe = _UNSAFE.sub("_", joined).lstrip("._-")
    if not safe:
        safe = "slide"
    if len(safe) > MAX_ID_LENGTH:
        safe = f"{safe[: MAX_ID_LENGTH - 9]}-{_short_hash(name)}"
    return safe


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def assign_slide_ids(names: list[str]) -> list[str]:
    """Return a safe, unique id for each name; names whose ids collide get a hash suffix.

    Ids are compared without case, because some file systems do not tell "A" from "a". Raises
    ValueError when a name repeats, because its outputs would overwrite each other.
    """
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise ValueError(f"slide names listed more than once: {repeated[:5]}. Give each slide its own name")
    ids = [safe_slide_id(name) for name in names]
    groups: dict[str, list[int]] = {}
    for index, slide_id in enumerate(ids):
        groups.setdefault(slide_id.lower(), []).append(index)
    for indices in groups.values():
        if len(indices) > 1:
            for index in indices:
                ids[index] = f"{ids[index][: MAX_ID_LENGTH - 9]}-{_short_hash(names[index])}"
    return ids


def _strip_extension(path: str) -> str:
    suffix = PurePosixPath(path).suffix
    return path[: -len(suffix)] if suffix else path


def _is_slide(path: str) -> bool:
    return PurePosixPath(path).suffix.lower() in SLIDE_EXTENSIONS


def _list_local(folder: Path) -> list[tuple[str, str]]:
    if folder.is_file():
        return [(_strip_extension(folder.name), str(folder))]
    if not folder.is_dir():
        raise FileNotFoundError(f"slide input {folder} not found; set --input to a folder or s3://bucket/prefix")
    found = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        hidden = any(part.startswith(".") for part in PurePosixPath(relative).parts)
        if path.is_file() and not hidden and _is_slide(relative):
            found.append((_strip_extension(relative), str(path)))
    return found


def _list_s3(uri: str, storage: SlideStorage) -> list[tuple[str, str]]:
    fs = storage.filesystem()
    prefix = uri[len(S3_SCHEME):].rstrip("/")
    if _is_slide(prefix) and fs.isfile(prefix):
        return [(_strip_extension(PurePosixPath(prefix).name), f"{S3_SCHEME}{prefix}")]
    found = []
    for key in sorted(fs.find(prefix + "/")):
        relative = key[len(prefix) + 1:]
        hidden = any(part.startswith(".") for part in PurePosixPath(relative).parts)
        if not hidden and _is_slide(relative):
            found.append((_strip_extension(relative), f"{S3_SCHEME}{key}"))
    return found


def _read_text(uri: str, storage: SlideStorage) -> str:
    if uri.startswith(S3_SCHEME):
        return storage.filesystem().cat_file(uri[len(S3_SCHEME):]).decode("utf-8")
    path = Path(uri).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} not found")
    return path.read_text(encoding="utf-8")


def _resolve(path: str, input_uri: str | None, manifest_uri: str) -> str:
    if path.startswith(S3_SCHEME) or Path(path).is_absolute():
        return path if path.startswith(S3_SCHEME) else str(Path(path).resolve())
    if input_uri is None:
        raise ValueError(
            f"manifest {manifest_uri} lists the relative path {path!r} but no --input folder is set to "
            "resolve it against; set --input or list absolute paths and s3:// URIs"
        )
    if input_uri.startswith(S3_SCHEME):
        return f"{input_uri.rstrip('/')}/{path}"
    return str((Path(input_uri).expanduser() / path).resolve())


def _read_manifest(manifest_uri: str, input_uri: str | None, storage: SlideStorage) -> list[tuple[str, str]]:
    """Read a CSV with a `path` column (and optionally `slide_id`) or a text file of paths."""
    text = _read_text(manifest_uri, storage)
    if manifest_uri.lower().endswith(".csv"):
        table = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
        if "path" not in table.columns:
            raise ValueError(f"manifest {manifest_uri} needs a 'path' column, got columns {list(table.columns)}")
        paths = [value.strip() for value in table["path"]]
        names = [value.strip() for value in table["slide_id"]] if "slide_id" in table.columns else [""] * len(paths)
    else:
        paths = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        names = [""] * len(paths)
    entries = []
    for path, name in zip(paths, names):
        if not path:
            continue
        uri = _resolve(path, input_uri, manifest_uri)
        entries.append((name or _strip_extension(path.removeprefix(S3_SCHEME).lstrip("/")), uri))
    return entries


def _inside(uri: str, prefix: str) -> bool:
    if uri.startswith(S3_SCHEME) != prefix.startswith(S3_SCHEME):
        return False
    if uri.startswith(S3_SCHEME):
        return uri.startswith(prefix.rstrip("/") + "/")
    return Path(prefix).expanduser().resolve() in Path(uri).parents


def list_slides(
    input_uri: str | None, manifest_uri: str | None, storage: SlideStorage, exclude: str | None = None
) -> list[SlideSource]:
    """List the slides to score: the manifest's entries, else every slide file under the input.

    Slide names are paths relative to the input without the extension ("batch1/slide7"), or the
    manifest's slide_id column. Files under `exclude` (the output prefix, whose heatmaps are
    PNG files) are left out. Raises ValueError when nothing is set or a slide is listed twice.
    """
    if manifest_uri:
        entries = _read_manifest(manifest_uri, input_uri, storage)
    elif input_uri:
        remote = input_uri.startswith(S3_SCHEME)
        entries = _list_s3(input_uri, storage) if remote else _list_local(Path(input_uri).expanduser().resolve())
        if exclude:
            entries = [(name, uri) for name, uri in entries if not _inside(uri, exclude)]
    else:
        raise ValueError("no slides to score: set --input (folder or s3://bucket/prefix) or --manifest")
    repeated = sorted(uri for uri, count in Counter(uri for _, uri in entries).items() if count > 1)
    if repeated:
        raise ValueError(f"slides listed more than once: {repeated[:5]}. List each slide once")
    uris_by_name: dict[str, list[str]] = {}
    for name, uri in entries:
        uris_by_name.setdefault(name, []).append(uri)
    clashes = {name: uris for name, uris in sorted(uris_by_name.items()) if len(uris) > 1}
    if clashes:
        examples = "; ".join(f"{name!r}: {', '.join(uris)}" for name, uris in list(clashes.items())[:3])
        raise ValueError(
            f"{len(clashes)} slide names belong to more than one file ({examples}). Slide ids come from file "
            "names without extension, so rename or move the extra files, or list the slides in a manifest "
            "with a slide_id column"
        )
    ids = assign_slide_ids([name for name, _ in entries])
    return [SlideSource(slide_id, uri, name) for slide_id, (name, uri) in zip(ids, entries)]
