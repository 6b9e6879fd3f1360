"""Training-run report as one self-contained HTML file, from a demo run folder.

Input: the folder pipeline.write_run_report fills (report.md, curves_<task>.png, summary.json,
eval/<model>/metrics.json and overlay PNGs) and, after the ablation job, ablation/ablation.md.
The page renders report.md (facts, headline, data, training table, training curves, model size
and speed, the metrics tables, overlays) with each referenced PNG embedded as base64, then
the ablation table when report.md does not already contain it.

report.md is rendered by a small converter for the Markdown that cervi_ray writes: headings,
paragraphs, "- " lists, pipe tables, images on their own line and `code` spans. Every piece of
text is escaped. Images are embedded only from inside the run folder, so a report cannot pull
in other files of the machine.
"""

import logging
import re
from pathlib import Path

from cervi_ray.review.slide_report import escape, html_page, image_tag

logger = logging.getLogger(__name__)

REPORT_FILE = "report.md"
ABLATION_FILE = Path("ablation") / "ablation.md"
ABLATION_HEADING = "## Ablation"
HTML_FILE = "report.html"
IMAGE_SUFFIXES = (".png",)

_HEADING = re.compile(r"^(#{1,6})\s+(.*)$")
_IMAGE = re.compile(r"^!\[(?P<alt>[^\]]*)\]\((?P<path>[^)\s]+)\)$")
_SEPARATOR_CELL = re.compile(r"^:?-{3,}:?$")
_CODE = re.compile(r"`([^`]+)`")


def _inline(text: str) -> str:
    """Escape a line of Markdown text and turn `code` spans into <code> elements."""
    return _CODE.sub(r"<code>\1</code>", escape(text))


def _table_cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _embed_image(alt: str, target: str, base: Path, root: Path) -> str:
    """Return an <img> of the PNG at `target` (relative to `base`), or a note when it is not embedded."""
    path = (base / target).resolve()
    if not path.is_relative_to(root):
        logger.warning("image %s lies outside the run folder %s; not embedded", target, root)
        return f'<p class="note">Image not embedded, outside the run folder: {escape(target)}</p>'
    if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
        logger.warning("image %s is missing or not a PNG; not embedded", path)
        return f'<p class="note">Image not found or not a PNG: {escape(target)}</p>'
    return f"<figure>{image_tag(path.read_bytes(), alt)}<figcaption>{escape(alt)}</figcaption></figure>"


def render_markdown(text: str, base: Path, root: Path, heading_shift: int = 0) -> str:
    """Convert cervi_ray's report Markdown to HTML, embedding images that lie under `root`.

    `base` is the folder that relative image paths start from; `heading_shift` demotes headings
    (1 turns # into <h2>).
    """
    root = root.resolve()
    blocks: list[str] = []
    paragraph: list[str] = []
    items: list[str] = []
    rows: list[list[str]] = []

    def flush() -> None:
        if paragraph:
            blocks.append("<p>" + " ".join(_inline(line) for line in paragraph) + "</p>")
            paragraph.clear()
        if items:
            blocks.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in items) + "</ul>")
            items.clear()
        if rows:
            header, *body = rows
            if body and all(_SEPARATOR_CELL.match(cell) for cell in body[0]):
                body = body[1:]
            head = "".join(f"<th>{_inline(cell)}</th>" for cell in header)
            cells = "".join("<tr>" + "".join(f"<td>{_inline(cell)}</td>" for cell in row) + "</tr>" for row in body)
            blocks.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
            rows.clear()

    for raw in text.splitlines():
        line = raw.strip()
        heading = _HEADING.match(line)
        image = _IMAGE.match(line)
        if not line:
            flush()
        elif heading:
            flush()
            level = min(6, len(heading.group(1)) + heading_shift)
            blocks.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif image:
            flush()
            blocks.append(_embed_image(image.group("alt"), image.group("path"), base, root))
        elif line.startswith("|"):
            if paragraph or items:
                flush()
            rows.append(_table_cells(line))
        elif line.startswith("- "):
            if paragraph or rows:
                flush()
            items.append(line[2:])
        else:
            if items or rows:
                flush()
            paragraph.append(line)
    flush()
    return "\n".join(blocks)


def _title(markdown: str, run_dir: Path) -> str:
    for line in markdown.splitlines():
        heading = _HEADING.match(line.strip())
        if heading and len(heading.group(1)) == 1:
            return heading.group(2)
    return f"cervi_ray run report: {run_dir.name}"


def render_run_html(run_dir: str | Path) -> str:
    """Render a demo run folder's report as one self-contained HTML page.

    Raises FileNotFoundError when the folder has no report.md.
    """
    run_dir = Path(run_dir).resolve()
    report = run_dir / REPORT_FILE
    if not report.is_file():
        raise FileNotFoundError(
            f"{report} not found: {run_dir} is not a finished demo run folder. Pass the folder that contains "
            "report.md (runs/<run.name> after `cervi-ray demo`)"
        )
    markdown = report.read_text(encoding="utf-8")
    parts = [render_markdown(markdown, run_dir, run_dir)]

    # Training curves that report.md does not show (older reports), from the curves PNGs.
    shown = set(re.findall(r"\]\(([^)\s]+)\)", markdown))
    extra_curves = [path for path in sorted(run_dir.glob("curves_*.png")) if path.name not in shown]
    if extra_curves:
        parts.append("<h2>Training curves</h2>")
        parts.extend(_embed_image(path.stem, path.name, run_dir, run_dir) for path in extra_curves)

    # The ablation table, unless the ablation job already appended it to report.md.
    ablation = run_dir / ABLATION_FILE
    if ablation.is_file() and f"\n{ABLATION_HEADING}\n" not in markdown:
        parts.append(render_markdown(ablation.read_text(encoding="utf-8"), ablation.parent, run_dir, heading_shift=1))

    # Where the page comes from.
    sources = [REPORT_FILE] + ([str(ABLATION_FILE)] if ablation.is_file() else [])
    parts.append(f'<p class="note">Rendered from {escape(", ".join(sources))} in {escape(run_dir)}.</p>')
    return html_page(_title(markdown, run_dir), "\n".join(parts))


def write_run_html(run_dir: str | Path, path: str | Path | None = None) -> Path:
    """Write the run's HTML report to `path` (default <run_dir>/report.html); returns the path."""
    target = Path(path) if path is not None else Path(run_dir) / HTML_FILE
    page = render_run_html(run_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(page, encoding="utf-8")
    logger.debug("wrote %s", target)
    return target
