"""Batch scoring of a slide archive: one Ray Data chain, with per-slide commits on the driver.

The chain (see build_dataset) reads like the job: slides -> tile rows -> pixels -> labels ->
statistics. The driver consumes its output as it streams, gathers each slide's rows and
commits the slide's files as soon as the last of its tiles arrives, so an interrupted job
keeps every slide it finished. Stage functions live in scoring/stages.py and know nothing of
Ray; this module is the only one in scoring/ that imports it.
"""

import hashlib
import json
import logging
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
from torch import nn

from cervi_ray.checkpoint import MODEL_FILE, load_model
from cervi_ray.config import Config, ConfigError, ScoringConfig
from cervi_ray.scoring.outputs import CommittedSlide, OutputStore, render_heatmap, slide_summary, tile_table
from cervi_ray.scoring.resolution import model_resolution
from cervi_ray.scoring.slides import SlideStorage
from cervi_ray.scoring.sources import SlideSource, list_slides
from cervi_ray.scoring.stages import (
    HEADER_INDEX, STAGE_SCHEMA, StageSettings, TileSegmenter, local_checkpoint, plan_slide, read_tiles,
    summarise_tiles, worker_threads,
)
from cervi_ray.storage import resolve_storage
from cervi_ray.tracking import scoring_metrics, scoring_tracker

logger = logging.getLogger(__name__)

MAX_SLIDE_BLOCKS = 1000  # input blocks of slide rows; more slides share a planning task
# Memory reserved per read task. A worker process that has imported torch, numpy and OpenCV is
# about 0.5 GiB resident (Ray Data's memory report on x86_64 Linux with torch 2.14). On top
# come four times the RGB bytes of the task's tiles, for the tiles and resampling buffers.
READ_TASK_BASE_MEMORY = 2**29
READ_MEMORY_FACTOR = 4


@dataclass
class ScoringReport:
    """Counts and timing of one scoring run."""

    output: str
    slides_listed: int
    slides_already_done: int
    statuses: Counter = field(default_factory=Counter)  # status -> slides committed this run
    committed: set[str] = field(default_factory=set)  # slide ids committed this run
    tiles_scored: int = 0
    seconds: float = 0.0


def checkpoint_identity(uri: str, endpoint_url: str | None) -> tuple[dict[str, Any], str]:
    """Load a checkpoint once on the driver, so a broken one fails before any actor starts.

    Returns its meta.json and the SHA-256 of its weights. An s3:// checkpoint is downloaded to a
    temporary folder, removed afterwards.
    """
    folder = local_checkpoint(uri, endpoint_url)
    try:
        _, meta = load_model(folder)
        with open(f"{folder}/{MODEL_FILE}", "rb") as stream:
            digest = hashlib.file_digest(stream, "sha256").hexdigest()
    finally:
        if folder != resolve_storage(uri, endpoint_url)[0]:
            shutil.rmtree(folder, ignore_errors=True)
    return meta, digest


def model_names(meta: dict[str, Any], weights_digest: str | None) -> tuple[str, str]:
    """Return (model name, model version): "<run name>-<kind>" and "<code version>+w<weights hash>"."""
    run_name = (meta.get("config") or {}).get("run", {}).get("name", "model")
    name = f"{run_name}-{meta.get('model_kind', 'unknown')}"
    version = str(meta.get("code_version", "unknown"))
    return name, f"{version}+w{weights_digest[:12]}" if weights_digest else version


def check_resources(scoring: ScoringConfig) -> None:
    """Raise ValueError unless the cluster fits the actor pool plus one reader task beside it."""
    # NOTE: this counts the resources the cluster has now, so it rejects an autoscaling cluster
    # that has not started its workers yet. Start such a cluster at its working size first.
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    needed = scoring.inference_actors * scoring.cpus_per_actor + scoring.cpus_per_reader
    if needed > cpus:
        raise ValueError(
            f"scoring needs {needed:g} CPUs (inference_actors {scoring.inference_actors} x cpus_per_actor "
            f"{scoring.cpus_per_actor:g}, plus cpus_per_reader {scoring.cpus_per_reader:g} so reads keep going) but "
            f"the cluster has {cpus:g}; lower scoring.inference_actors or scoring.cpus_per_actor"
        )
    if scoring.gpus_per_actor * scoring.inference_actors > gpus:
        raise ValueError(
            f"scoring needs {scoring.gpus_per_actor * scoring.inference_actors:g} GPUs but the cluster has "
            f"{gpus:g}; set scoring.gpus_per_actor=0 to run on CPUs"
        )


def build_dataset(
    slides: list[SlideSource],
    settings: StageSettings,
    scoring: ScoringConfig,
    label_mode: str,
    model: nn.Module | None = None,
) -> ray.data.Dataset:
    """Chain the stages over `slides`; the output has one row per tile and per slide (STAGE_SCHEMA)."""
    tiles_per_forward = max(1, scoring.batch_size // len(scoring.tta))  # batch_size counts TTA views
    segmenter_arguments = {
        "checkpoint": None if model is not None else scoring.checkpoint,
        "endpoint_url": scoring.endpoint_url,
        "tta": list(scoring.tta),
        "forward_batch": scoring.batch_size,
        "use_gpu": scoring.gpus_per_actor > 0,
        "threads": worker_threads(scoring.cpus_per_actor),
        "label_mode": label_mode,
        "model": model,
        "worker_log_level": scoring.worker_log_level,
    }
    slide_rows = [{"slide_id": slide.slide_id, "uri": slide.uri} for slide in slides]
    return (
        ray.data.from_items(slide_rows, override_num_blocks=min(len(slide_rows), MAX_SLIDE_BLOCKS))
        # Open each slide, detect the foreground on a thumbnail and lay the tile grid.
        .flat_map(plan_slide, fn_kwargs={"settings": settings}, num_cpus=scoring.cpus_per_reader)
        # Small blocks, so the tiles of one large slide spread over many read tasks.
        .repartition(target_num_rows_per_block=scoring.tiles_per_read_task)
        # Read each tile at the chosen level and resample it to the model's pixels (CPU tasks). The
        # memory request also keeps Ray Data 2.60 from fusing the reads into the inference actors,
        # which it does for stages with equal resource requests.
        .map_batches(
            read_tiles, fn_kwargs={"settings": settings},
            batch_size=scoring.tiles_per_read_task, num_cpus=scoring.cpus_per_reader,
            memory=READ_TASK_BASE_MEMORY + READ_MEMORY_FACTOR * scoring.tiles_per_read_task * scoring.tile_size**2 * 3,
        )
        # Label the tiles with TTA in a pool of actors, each loading the model once. Ray Data 2.60
        # starts a killed or crashed actor again (max_restarts=-1) and retries its unfinished
        # batches (max_task_retries=-1) by default. Setting these here would need ray_remote_args,
        # which Ray 2.60 deprecates. tests/test_multinode.py kills the actor of a scoring job mid-run.
        # NOTE: the retries are unlimited. A batch that kills every actor it reaches (out of
        # memory) keeps the job retrying, so lower scoring.batch_size if the log shows restarts.
        .map_batches(
            TileSegmenter, fn_constructor_kwargs=segmenter_arguments,
            batch_size=tiles_per_forward,
            compute=ray.data.ActorPoolStrategy(size=scoring.inference_actors),
            num_cpus=scoring.cpus_per_actor, num_gpus=scoring.gpus_per_actor,
        )
        # Per-tile statistics; label masks are dropped here, or kept as PNG bytes.
        .map_batches(
            summarise_tiles, fn_kwargs={"settings": settings},
            batch_size=tiles_per_forward, num_cpus=scoring.cpus_per_reader,
        )
    )


class SlideCollector:
    """Gathers the streamed rows of each slide until its header and all its tiles have come.

    A row that arrives a second time (a retried task that repeats output) is dropped, and so are
    rows of a slide already returned, so each tile reaches the outputs once.
    """

    def __init__(self) -> None:
        self._parts: dict[str, list[pa.Table]] = defaultdict(list)
        self._tiles: Counter = Counter()
        self._headers: dict[str, tuple[dict[str, Any], bytes]] = {}
        self._received: dict[str, set[int]] = defaultdict(set)  # tile indices of each pending slide
        self._returned: set[str] = set()

    def add(self, table: pa.Table) -> list[tuple[str, dict[str, Any], bytes, pa.Table]]:
        """Add a batch of stage rows; return (slide_id, info, thumbnail, rows) of completed slides."""
        completed = []
        for slide_id in pc.unique(table["slide_id"]).to_pylist():
            part = self._new_rows(slide_id, table.filter(pc.equal(table["slide_id"], slide_id)))
            if part.num_rows == 0:
                continue
            header = part.filter(pc.equal(part["tile_index"], HEADER_INDEX))
            if header.num_rows:
                self._headers[slide_id] = (json.loads(header["slide_info"][0].as_py()), header["thumbnail"][0].as_py())
            self._parts[slide_id].append(part)
            self._tiles[slide_id] += part.num_rows - header.num_rows
            if slide_id in self._headers and self._tiles[slide_id] >= self._headers[slide_id][0].get("tiles_kept", 0):
                completed.append(self._pop(slide_id))
        return completed

    def _new_rows(self, slide_id: str, part: pa.Table) -> pa.Table:
        """Return the rows of `part` (one slide's rows) whose tile index has not arrived before."""
        if slide_id in self._returned:
            logger.warning(
                "dropped %d rows of slide %s, which arrived after the slide was complete", part.num_rows, slide_id
            )
            return part.slice(0, 0)
        received = self._received[slide_id]
        keep = []
        for index in part["tile_index"].to_pylist():
            keep.append(index not in received)
            received.add(index)
        if all(keep):
            return part
        logger.warning("dropped %d repeated rows of slide %s", keep.count(False), slide_id)
        return part.filter(pa.array(keep))

    def _pop(self, slide_id: str) -> tuple[str, dict[str, Any], bytes, pa.Table]:
        info, thumbnail = self._headers.pop(slide_id, ({}, b""))
        rows = pa.concat_tables(self._parts.pop(slide_id))
        del self._tiles[slide_id]
        self._received.pop(slide_id, None)
        self._returned.add(slide_id)
        return slide_id, info, thumbnail, rows

    def unfinished(self) -> list[tuple[str, dict[str, Any], bytes, pa.Table]]:
        """Return every slide still waiting for rows, marked failed with the count that came."""
        leftovers = []
        for slide_id in list(self._parts):
            slide_id, info, thumbnail, rows = self._pop(slide_id)
            expected = info.get("tiles_kept", "an unknown number of")
            arrived = int(pc.sum(pc.not_equal(rows["tile_index"], HEADER_INDEX)).as_py() or 0)
            info = {**info, "status": "failed", "error": f"scoring ended with {arrived} of {expected} tiles of this slide"}
            leftovers.append((slide_id, info, thumbnail, rows))
        return leftovers


def score_archive(config: Config, model: nn.Module | None = None, model_meta: dict[str, Any] | None = None) -> ScoringReport:
    """Score every slide of config.scoring.input (or its manifest) that has no complete result yet.

    `model` replaces the checkpoint, for tests with oracle models; then `model_meta` gives its
    description (training_resolution, label_mode, model_kind) as a checkpoint's meta.json would.
    Starts or joins Ray (config.ray) when it is not running. With config.tracking on, the run's
    counts and throughput go to an MLflow run named <run.name>-score.
    """
    # Settings checks come first, so a run that cannot start leaves no MLflow run behind.
    _check_settings(config, model)
    with scoring_tracker(config) as tracker:
        report = _score_archive(config, model, model_meta)
        tracker.log_metrics(scoring_metrics(report), step=0)
    return report


def _check_settings(config: Config, model: nn.Module | None) -> None:
    if config.scoring.output is None:
        raise ConfigError("scoring.output is not set; pass --output FOLDER or s3://bucket/prefix")
    if model is None and config.scoring.checkpoint is None:
        raise ConfigError("scoring.checkpoint is not set; pass --checkpoint FOLDER or s3:// URI")


def _score_archive(config: Config, model: nn.Module | None, model_meta: dict[str, Any] | None) -> ScoringReport:
    from cervi_ray.train.trainer import ensure_ray  # imports Ray Train; only needed here

    scoring = config.scoring
    started = time.perf_counter()

    # Model description, resolution and the settings the results depend on (score_archive has
    # checked that output and, without a model, checkpoint are set).
    if model is None:
        meta, digest = checkpoint_identity(scoring.checkpoint, scoring.endpoint_url)
    else:
        meta, digest = dict(model_meta or {}), None
    model_mpp = model_resolution(meta, scoring.model_mpp)
    model_name, model_version = model_names(meta, digest)
    label_mode = meta.get("label_mode", "full")
    store = OutputStore(scoring.output, scoring.endpoint_url)
    # scoring.slide_mpp is left out: it only fills in slides without resolution metadata, each
    # slide's summary records the pixel size it used and where it came from, and setting it is
    # how a rerun rescores the slides that failed for lack of metadata.
    store.check_run({
        "model_name": model_name, "model_version": model_version, "model_mpp": model_mpp.mpp,
        "tile_size": scoring.tile_size, "overlap": scoring.overlap, "min_tissue_fraction": scoring.min_tissue_fraction,
        "tta": list(scoring.tta), "thumbnail_size": scoring.thumbnail_size,
    })

    # Slides, minus those an earlier run completed.
    storage = SlideStorage(scoring.endpoint_url, scoring.cache_dir, scoring.remote_access)
    slides = list_slides(scoring.input, scoring.manifest, storage, exclude=scoring.output)
    committed = store.completed()
    pending = [slide for slide in slides if slide.slide_id not in committed or committed[slide.slide_id].status != "ok"]
    warn_changed_sources(slides, committed)
    report = ScoringReport(scoring.output, len(slides), len(slides) - len(pending))
    logger.info(
        "scoring %d slides of %d (%d already complete) with %s at %.3g microns per pixel (%s) into %s",
        len(pending), len(slides), report.slides_already_done, model_name, model_mpp.mpp, model_mpp.source, scoring.output,
    )
    if not pending:
        return report

    # Run the chain and commit each slide as its last row arrives.
    ensure_ray(config.ray)
    check_resources(scoring)
    store.clear_staging()
    settings = StageSettings(
        tile_size=scoring.tile_size, overlap=scoring.overlap, min_tissue_fraction=scoring.min_tissue_fraction,
        model_mpp=model_mpp.mpp, slide_mpp=scoring.slide_mpp, thumbnail_size=scoring.thumbnail_size,
        storage=storage, views=len(scoring.tta), has_cytoplasm=label_mode == "full",
        write_masks=scoring.write_masks, worker_log_level=scoring.worker_log_level,
    )
    committer = SlideCommitter(store, report, {slide.slide_id: slide.uri for slide in pending}, scoring.top_k, model_name, model_version)
    collector = SlideCollector()
    dataset = build_dataset(pending, settings, scoring, label_mode, model)
    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        for slide in collector.add(batch):
            committer.commit(*slide)
    for slide in collector.unfinished():
        committer.commit(*slide)
    # A slide none of whose rows came back still gets a failed summary.
    for slide_id in committer.sources.keys() - report.committed:
        committer.commit(slide_id, {"status": "failed", "error": "no rows came back for this slide"}, b"", STAGE_SCHEMA.empty_table())

    store.clear_staging()
    report.seconds = time.perf_counter() - started
    logger.info(
        "scoring finished in %.1f s: %s, %d tiles scored", report.seconds, dict(report.statuses), report.tiles_scored
    )
    return report


def warn_changed_sources(slides: list[SlideSource], committed: dict[str, CommittedSlide]) -> None:
    """Log the complete slides whose id now belongs to another file than the one scored.

    Reruns skip complete slides by id, so a moved or replaced file keeps its earlier results.
    """
    changed = sorted(
        slide.slide_id for slide in slides
        if slide.slide_id in committed and committed[slide.slide_id].status == "ok"
        and committed[slide.slide_id].source != slide.uri
    )
    if changed:
        logger.warning(
            "these complete slides were scored from another file than the one listed now, and their earlier "
            "results are kept: %s (%d in all). To score them again, delete slides/<slide_id>.parquet under the output",
            ", ".join(changed[:5]) + (", ..." if len(changed) > 5 else ""), len(changed),
        )


class SlideCommitter:
    """Writes each finished slide's files and logs progress: slides done of total, tiles per second."""

    def __init__(
        self, store: OutputStore, report: ScoringReport, sources: dict[str, str], top_k: int, model_name: str, model_version: str
    ):
        self.store = store
        self.report = report
        self.sources = sources  # slide id -> URI, for the slides of this run
        self.top_k = top_k
        self.model_name = model_name
        self.model_version = model_version
        self.started = time.perf_counter()

    def commit(self, slide_id: str, info: dict[str, Any], thumbnail: bytes, rows: pa.Table) -> None:
        tiles = tile_table(rows, self.model_name, self.model_version)
        summary = slide_summary(slide_id, self.sources[slide_id], info, tiles, self.top_k, self.model_name, self.model_version)
        heatmap = render_heatmap(thumbnail, info, rows) if thumbnail else None
        self.store.commit_slide(slide_id, tiles, summary, heatmap)

        result = summary.to_pylist()[0]
        self.report.statuses[result["status"]] += 1
        self.report.committed.add(slide_id)
        self.report.tiles_scored += result["tiles_scored"]
        rate = self.report.tiles_scored / max(time.perf_counter() - self.started, 1e-9)
        logger.info(
            "slide %d/%d %s: %s, %d tiles scored, %d background, %d failed (%.2f tiles/s since the chain started)%s",
            len(self.report.committed), len(self.sources), slide_id, result["status"], result["tiles_scored"],
            result["tiles_skipped_background"], result["tiles_failed"], rate,
            f": {result['error']}" if result["status"] != "ok" else "",
        )
