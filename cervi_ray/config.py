"""Typed, validated run configuration loaded from YAML (configs/*.yaml).

Every section rejects unknown keys, so a typo fails at load time with the key's path instead
of being ignored. The resolved config is saved next to every output and inside every
checkpoint.
"""

import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cervi_ray.data.labels import NUM_CLASSES
from cervi_ray.retrying_fs import DEFAULT_RETRIES, DEFAULT_RETRY_DELAY

DATA_ROOT_ENV = "CERVI_RAY_DATA"
# Ray's job supervisor sets this in the driver of a submitted job: the JobConfig as JSON, with
# the job's runtime_env (Ray 2.60, ray.dashboard.modules.job.job_supervisor).
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
DEFAULT_DATA_ROOT = "../shared/data"  # relative to the working directory


class ConfigError(ValueError):
    """A config file or override that cannot be used, with the key and the fix."""


def _in_ray_working_dir_copy() -> bool:
    """Return True in the driver of a Ray job submitted with a working_dir, whose current folder is Ray's copy."""
    try:
        job_config = json.loads(os.environ.get(RAY_JOB_CONFIG_ENV) or "{}")
    except json.JSONDecodeError:
        return False
    runtime_env = job_config.get("runtime_env") if isinstance(job_config, dict) else None
    return isinstance(runtime_env, dict) and bool(runtime_env.get("working_dir"))


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceConfig(Section):
    name: str
    kind: Literal[
        "isbi2015", "isbi2014_train45", "isbi2014_test90", "isbi2014_edf_real", "folder",
        "dtu_herlev", "sipakmed", "cx22",
    ]
    path: str  # relative to data.root, or absolute
    # "auto" joins the seeded group split; "test" (or train/val) pins every image of the
    # source, e.g. an evaluation-only set.
    split: Literal["auto", "train", "val", "test"] = "auto"
    group_pattern: str | None = None  # folder kind: regex whose first group names the group
    value_map: dict[int, int] | None = None  # folder kind: mask pixel value -> label
    annotation: Literal["full", "nucleus"] | None = None  # folder kind: "nucleus" for nuclei-only masks
    # dtu_herlev kind: segmentation colour ("#RRGGBB", quoted in YAML, or "R,G,B") -> label.
    # None uses the reader's DEFAULT_COLOUR_MAP.
    colour_map: dict[str, int] | None = None
    # cx22 kind: MATLAB variable name of each role ("images", "cells", "nuclei"). None uses the defaults.
    mat_variables: dict[str, str] | None = None


class SplitConfig(Section):
    seed: int = 0
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    # With 5 folds of the non-test 80 %, each validation fold is 16 % of the data: fold 0 is
    # the 64 / 16 / 20 train / val / test split.
    folds: int = Field(5, ge=2)
    fold: int = Field(0, ge=0)
    file: str | None = None  # default: <run.output_dir>/splits.json, shared by later runs

    @model_validator(mode="after")
    def _fold_in_range(self) -> "SplitConfig":
        if self.fold >= self.folds:
            raise ValueError(f"fold must be below folds ({self.folds}), got {self.fold}")
        return self


class AugmentConfig(Section):
    enabled: bool = True
    hflip_p: float = Field(0.5, ge=0.0, le=1.0)
    vflip_p: float = Field(0.5, ge=0.0, le=1.0)
    rotate_limit: float = Field(45.0, ge=0.0, le=180.0)  # degrees
    rotate_p: float = Field(0.5, ge=0.0, le=1.0)
    occlusion_p: float = Field(0.5, ge=0.0, le=1.0)
    brightness: float = Field(0.2, ge=0.0)
    contrast: float = Field(0.2, ge=0.0)
    saturation: float = Field(0.2, ge=0.0)
    jitter_p: float = Field(0.5, ge=0.0, le=1.0)


class DataConfig(Section):
    root: str | None = None  # default: $CERVI_RAY_DATA, else ../shared/data
    sources: list[SourceConfig] = Field(min_length=1)
    label_mode: Literal["full", "nucleus"] = "full"
    # Resampling factor applied to every image on load (0.5 halves each side). Masks are
    # resampled with nearest neighbour; metrics are computed at the original resolution.
    scale: float = Field(1.0, gt=0.0, le=4.0)
    crop_size: int | None = Field(512, ge=32)  # random training crops, pixels after scaling
    resize_to: int | None = Field(None, ge=32)  # alternative to crops: resize whole images
    repeats: int = Field(4, ge=1)  # crops drawn from each training image per epoch
    foreground_crop_p: float = Field(0.5, ge=0.0, le=1.0)  # share of crops centred on a cell
    # Microns per pixel of the source images at scale 1.0, recorded in checkpoints so scoring
    # can match slide resolution. None records "unknown".
    mpp: float | None = Field(None, gt=0.0)
    # Nominal objective magnification of the source images at scale 1.0 (e.g. 40 for the
    # ISBI images), recorded when the pixel size is not known. None records "unknown".
    magnification: float | None = Field(None, gt=0.0)
    augment: AugmentConfig = AugmentConfig()
    split: SplitConfig = SplitConfig()

    @model_validator(mode="after")
    def _crop_or_resize(self) -> "DataConfig":
        if self.crop_size is not None and self.resize_to is not None:
            raise ValueError("set crop_size or resize_to, not both (the other to null)")
        names = [source.name for source in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        return self

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES if self.label_mode == "full" else 2


class TeacherConfig(Section):
    # ResNeXt-101 32x8d: about 90 M parameters, as strong as the method's > 80 M teacher.
    encoder: str = "resnext101_32x8d"
    encoder_weights: str | None = None  # "imagenet" downloads weights; None needs no network
    output_stride: Literal[8, 16] = 16
    decoder_channels: int = Field(256, ge=8)


class StudentConfig(Section):
    embed_dim: int = Field(64, ge=8)  # four stages: 64, 128, 256, 512 channels
    depths: list[int] = [1, 1, 2, 1]  # Double Swin blocks per stage
    num_heads: list[int] = [2, 4, 8, 16]
    window_size: int = Field(8, ge=1)  # 8 divides the 128/64/32/16 maps of a 512 input
    mlp_ratio: float = Field(2.0, gt=0.0)
    drop_path_rate: float = Field(0.1, ge=0.0, lt=1.0)
    gate_hidden: int = Field(8, ge=1)
    compressor_reduction: int = Field(4, ge=1)
    decoder_channels: list[int] = [128, 64, 32]


class BaselineConfig(Section):
    """Encoder of the U-Net, U-Net++ and DeepLabV3 baselines (segmentation_models_pytorch)."""

    encoder: str = "resnet18"
    encoder_weights: str | None = None


class ModelConfig(Section):
    in_channels: int = 3
    input_size: int = 512  # nominal input side, used for MAC counts and window sizing
    teacher: TeacherConfig = TeacherConfig()
    student: StudentConfig = StudentConfig()
    baselines: BaselineConfig = BaselineConfig()


class LossConfig(Section):
    alpha: float = Field(0.5, ge=0.0, le=1.0)  # weight of cross-entropy; 1 - alpha goes to Dice
    dice_smooth: float = Field(1.0, ge=0.0)


class DistillConfig(Section):
    temperature: float = Field(4.0, gt=0.0)
    soft_weight: float = Field(0.5, ge=0.0)
    feature_weight: float = Field(0.3, ge=0.0)
    seg_weight: float = Field(0.2, ge=0.0)
    feature_level: Literal["encoder", "decoder"] = "decoder"
    teacher_checkpoint: str | None = None  # directory or s3:// URI; the demo fills it in


class OptimConfig(Section):
    epochs: int = Field(200, ge=1)
    batch_size_per_worker: int = Field(8, ge=1)
    lr: float = Field(2e-4, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    val_every: int = Field(2, ge=1)  # epochs between validations (and checkpoints)
    plateau_patience: int = Field(3, ge=0)  # validations without gain before the LR drops
    plateau_factor: float = Field(0.5, gt=0.0, lt=1.0)
    min_lr: float = Field(1e-6, ge=0.0)
    early_stop_patience: int = Field(8, ge=1)  # validations without gain before stopping
    grad_clip: float | None = Field(1.0, gt=0.0)
    max_minutes: float | None = Field(None, gt=0.0)  # wall-clock budget; stops after a validation


class ScalingConfig(Section):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: int = Field(1, ge=1)


class RayConfig(Section):
    address: str | None = None  # None: start a local Ray on 127.0.0.1 (or join RAY_ADDRESS)
    num_cpus: int | None = Field(None, ge=1)  # local Ray only; None uses every core


class RunConfig(Section):
    name: str = Field("cervi-ray", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    output_dir: str = "runs"  # local folder for reports, metrics and overlays
    storage_path: str | None = None  # Ray checkpoints: local path or s3://; None: <output_dir>/ray
    storage_endpoint_url: str | None = None  # S3-compatible endpoint, e.g. a MinIO server
    max_failures: int = Field(2, ge=-1)  # worker failures to recover from before giving up
    checkpoints_to_keep: int = Field(2, ge=1)
    seed: int = 0
    # s3:// storage: retries of a call that failed with a transient error (timeout, HTTP 5xx,
    # throttling, dropped connection), after pyarrow's own request retries. The first retry
    # waits storage_retry_delay seconds, each later one twice as long, up to 30 s.
    storage_retries: int = Field(DEFAULT_RETRIES, ge=0)
    storage_retry_delay: float = Field(DEFAULT_RETRY_DELAY, ge=0.0)

    @field_validator("output_dir")
    @classmethod
    def _absolute_output_dir(cls, value: str) -> str:
        # Ray Train workers and Tune trials run in folders of their own, where a relative path
        # would put their MLflow and TensorBoard records away from the driver's.
        return str(Path(value).expanduser().resolve())


TTA_TRANSFORMS = ("identity", "rot90", "rot180", "rot270", "hflip", "vflip", "transpose", "antitranspose")
TTAName = Literal["identity", "rot90", "rot180", "rot270", "hflip", "vflip", "transpose", "antitranspose"]
ModelKindName = Literal["teacher", "student", "unet", "unetplusplus", "deeplabv3"]


class EvalConfig(Section):
    split: Literal["train", "val", "test"] = "test"
    tta: list[TTAName] = list(TTA_TRANSFORMS)  # views averaged by test-time augmentation
    n_boot: int = Field(1000, ge=0)  # bootstrap replicates for per-image confidence intervals
    overlays: int = Field(4, ge=0)  # overlay PNGs written per evaluation set
    latency_runs: int = Field(5, ge=1)  # forward passes timed per model for time per image


class ScoringConfig(Section):
    """Batch scoring of slide archives with Ray Data (the `score` command)."""

    input: str | None = None  # folder or s3://bucket/prefix of slides
    manifest: str | None = None  # optional file listing the slides to score
    checkpoint: str | None = None  # model checkpoint folder or s3:// URI
    output: str | None = None  # folder or s3://bucket/prefix for the Parquet datasets
    endpoint_url: str | None = None  # S3-compatible endpoint for input and output
    tile_size: int = Field(512, ge=32)  # tile side in pixels at the model's resolution
    overlap: int = Field(64, ge=0)  # pixels shared by neighbouring tiles
    min_tissue_fraction: float = Field(0.05, ge=0.0, le=1.0)  # tiles with less foreground are skipped
    model_mpp: float | None = Field(None, gt=0.0)  # override for checkpoints without a resolution
    slide_mpp: float | None = Field(None, gt=0.0)  # override for slides without MPP or objective power
    tta: list[TTAName] = ["identity", "hflip", "vflip"]
    batch_size: int = Field(24, ge=1)  # images per model forward, counted after TTA expansion
    inference_actors: int = Field(1, ge=1)
    cpus_per_actor: float = Field(1.0, gt=0.0)
    gpus_per_actor: float = Field(0.0, ge=0.0)
    cpus_per_reader: float = Field(1.0, gt=0.0)
    write_masks: bool = False  # store each tile's label mask as PNG bytes
    top_k: int = Field(10, ge=1)  # most suspicious tiles listed per slide
    # Tiles per read task; small enough that the tiles of one large slide spread over many tasks.
    tiles_per_read_task: int = Field(16, ge=1)
    # Longer side of the heatmap's thumbnail, and the smallest foreground image (large slides get
    # a finer one, about 16 pixels per tile side).
    thumbnail_size: int = Field(1024, ge=64)
    # Remote TIFF: "range" reads only the tiles needed, "download" copies the file first. Remote
    # OpenSlide formats (SVS, NDPI, MRXS, ...) are always downloaded.
    remote_access: Literal["range", "download"] = "range"
    cache_dir: str | None = None  # downloaded slides; None: <system temp>/cervi_ray_slides
    # Log level of cervi_ray loggers inside Ray tasks and actors; WARNING keeps the driver log quiet.
    worker_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"

    @model_validator(mode="after")
    def _overlap_below_tile(self) -> "ScoringConfig":
        if self.overlap >= self.tile_size:
            raise ValueError(f"overlap ({self.overlap}) must be smaller than tile_size ({self.tile_size})")
        return self


class SweepResources(Section):
    cpus_per_trial: int = Field(1, ge=1)
    gpus_per_trial: float = Field(0.0, ge=0.0)
    # Trials running at once; with 1 CPU per trial, 2 fill a 2-core machine.
    max_concurrent_trials: int = Field(2, ge=1)
    max_failures: int = Field(1, ge=0)  # retries of a crashed trial from its last checkpoint


class CVConfig(SweepResources):
    """k-fold cross-validation on Ray Tune: one trial per fold (times the parameter grid)."""

    name: str = Field("cv", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    # teacher, student (supervised), distill (student taught by the teacher sweep's fold
    # checkpoint) or a baseline architecture.
    task: Literal["teacher", "student", "distill", "unet", "unetplusplus", "deeplabv3"] = "teacher"
    folds: list[int] | None = None  # default: every fold of data.split.folds
    sources: list[str] | None = None  # restrict the sweep to these sources; None: all
    teacher_sweep: str | None = None  # task distill: name of the teacher sweep to learn from
    # Extra grid crossed with the folds: {"teacher_train.lr": [1e-3, 5e-4]}.
    param_grid: dict[str, list[Any]] = {}


class PruneConfig(SweepResources):
    """Pruning search on Ray Tune: magnitude sparsities and a structured variant, each fine-tuned."""

    name: str = Field("prune", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    sparsities: list[float] = [0.2, 0.4, 0.6, 0.8]  # global magnitude-pruning candidates
    tolerance: float = Field(0.02, ge=0.0)  # allowed drop of validation Dice (absolute)
    include_norm: bool = False  # prune normalisation weights too
    include_output: bool = False  # prune the output classifier too
    structured_keep_ratio: float | None = Field(0.5, gt=0.0, le=1.0)  # None: no structured trial
    distill: bool = True  # keep the distillation loss on while fine-tuning
    finetune: OptimConfig = OptimConfig(
        epochs=6, lr=1e-4, val_every=2, plateau_patience=1, early_stop_patience=3
    )
    student_checkpoint: str | None = None  # folder or s3:// URI; the ablation job fills it in
    teacher_checkpoint: str | None = None


class AblationConfig(Section):
    """The method's ablation table: student variants, the teacher and smp baselines."""

    name: str = Field("ablation", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    baselines: list[Literal["unet", "unetplusplus", "deeplabv3"]] = ["unet", "unetplusplus", "deeplabv3"]


class TrackingConfig(Section):
    """Experiment tracking of training runs, sweep trials, the demo and scoring (cervi_ray.tracking)."""

    enabled: bool = True  # false: no MLflow runs and no TensorBoard files
    # None: a local SQLite store at <run.output_dir>/mlruns/mlflow.db, artifacts beside it. Rank 0
    # of each training run writes to it from its own node, so on a multi-node cluster set a
    # tracking server URI (http://...) that every node reaches.
    mlflow_tracking_uri: str | None = Field(None, min_length=1)
    experiment_name: str = Field("cervi_ray", min_length=1)
    tensorboard: bool = True  # event files under <run.output_dir>/tensorboard/<run name>


class Config(Section):
    data: DataConfig
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    teacher_train: OptimConfig = OptimConfig()
    student_train: OptimConfig = OptimConfig()
    distill: DistillConfig = DistillConfig()
    scaling: ScalingConfig = ScalingConfig()
    ray: RayConfig = RayConfig()
    run: RunConfig = RunConfig()
    eval: EvalConfig = EvalConfig()
    cv: CVConfig = CVConfig()
    prune: PruneConfig = PruneConfig()
    ablation: AblationConfig = AblationConfig()
    scoring: ScoringConfig = ScoringConfig()
    tracking: TrackingConfig = TrackingConfig()

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir).resolve() / self.run.name

    @property
    def splits_file(self) -> Path:
        if self.data.split.file is not None:
            return Path(self.data.split.file).resolve()
        return Path(self.run.output_dir).resolve() / "splits.json"

    @property
    def storage_path(self) -> str:
        if self.run.storage_path is not None:
            return self.run.storage_path
        return str(Path(self.run.output_dir).resolve() / "ray")

    def data_root(self) -> Path:
        """Resolve the data folder: data.root, else $CERVI_RAY_DATA, else ../shared/data."""
        root = self.data.root or os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT
        path = Path(root).expanduser().resolve()
        if not path.is_dir():
            raise ConfigError(
                f"data folder {path} not found: set data.root in the config or the "
                f"{DATA_ROOT_ENV} environment variable to the folder that holds the datasets"
            )
        return path


def _apply_override(tree: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (so 3, true, [1, 2])."""
    key, sep, raw_value = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} must look like section.key=value")
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw_value)


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"  {location}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def config_from_dict(tree: dict[str, Any], origin: str = "config") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(f"invalid {origin}:\n{_describe(e)}") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a YAML config and apply `section.key=value` overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; the examples are in configs/")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must contain a mapping of sections, got {type(tree).__name__}")
    for override in overrides or []:
        _apply_override(tree, override)
    try:
        config = config_from_dict(tree, origin=f"config {path}")
    except ConfigError as e:
        raise ConfigError(
            f"{e}\nAdd, correct or remove these keys in {path} or in the --set overrides. The classes in "
            "cervi_ray/config.py list every key with its type and default."
        ) from None
    _check_output_dir_kept(config)
    return config


def _check_output_dir_kept(config: Config) -> None:
    """Raise ConfigError when run.output_dir lies in the temporary working_dir copy of a Ray job."""
    if not _in_ray_working_dir_copy():
        return
    working_copy = Path.cwd().resolve()
    output_dir = Path(config.run.output_dir)
    if output_dir == working_copy or working_copy in output_dir.parents:
        raise ConfigError(
            f"run.output_dir {output_dir} is inside {working_copy}, the copy of the job's working_dir that "
            "Ray deletes once no job uses it, so the run's reports and metrics would be lost. Set an absolute "
            "path outside it (on a multi-node cluster, a folder every node shares), e.g. "
            "--set run.output_dir=/results"
        )


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def save_config(config: Config, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_config(config))
