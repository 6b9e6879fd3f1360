"""Command line: `cervi-ray <command> --config FILE [--set section.key=value ...]`."""

import argparse
import json
import logging
import sys
from pathlib import Path

from cervi_ray.config import Config, ConfigError, load_config
from cervi_ray.data import catalog
from cervi_ray.export import command as export_command
from cervi_ray.review import command as review_command
from cervi_ray.scoring import command as scoring_command

logger = logging.getLogger("cervi_ray")

DEFAULT_CONFIG = "configs/demo.yaml"


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML config file (default {DEFAULT_CONFIG})")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override a config value, e.g. --set teacher_train.epochs=3 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cervi-ray", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train the teacher, distil the student, evaluate, write the report")
    _add_common(demo)

    teacher = commands.add_parser("train-teacher", help="train the DeepLabV3+ teacher on Ray Train")
    _add_common(teacher)

    distill = commands.add_parser("distill", help="distil the teacher into the CerviSegNet student on Ray Train")
    _add_common(distill)
    distill.add_argument("--teacher", help="teacher checkpoint folder or s3:// URI (else distill.teacher_checkpoint)")

    evaluate = commands.add_parser("evaluate", help="evaluate a checkpoint: metrics JSON and overlay PNGs")
    _add_common(evaluate)
    evaluate.add_argument("--checkpoint", required=True, help="checkpoint folder or s3:// URI")
    evaluate.add_argument("--split", choices=("train", "val", "test"), help="split to evaluate (else eval.split)")
    evaluate.add_argument("--output", help="output folder (default <run dir>/evaluate)")

    cv = commands.add_parser("cv", help="k-fold cross-validation sweep on Ray Tune (restores an interrupted one)")
    _add_common(cv)

    prune = commands.add_parser("prune", help="pruning search on Ray Tune: sparsities and a structured variant")
    _add_common(prune)
    prune.add_argument(
        "--student", help="student checkpoint folder or s3:// URI (default: best of the <run.name>-student run)"
    )
    prune.add_argument(
        "--teacher", help="teacher checkpoint for distillation while fine-tuning (default: best of <run.name>-teacher)"
    )

    ablation = commands.add_parser("ablation", help="train and evaluate every row of the method's ablation table")
    _add_common(ablation)

    export = commands.add_parser("export", help="write a self-describing model bundle with ONNX files")
    _add_common(export)
    export_command.add_arguments(export)

    datasets = commands.add_parser("datasets", help="list the supported datasets, or verify a download's SHA-256")
    catalog.add_arguments(datasets)

    manifest = commands.add_parser("manifest", help="build the manifest and the splits file, print counts")
    _add_common(manifest)

    complexity = commands.add_parser("complexity", help="print parameters and MACs of teacher and student")
    _add_common(complexity)

    review = commands.add_parser(
        "review", help="QuPath GeoJSON and HTML review pages for scored slides, or a run's HTML report"
    )
    _add_common(review)
    review_command.add_arguments(review)

    score = commands.add_parser("score", help="score a slide archive with Ray Data: per-tile and per-slide Parquet, heatmaps")
    _add_common(score)
    scoring_command.add_arguments(score)
    return parser


def _configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )


def cmd_demo(config: Config, args: argparse.Namespace) -> None:
    from cervi_ray.pipeline import run_pipeline

    report = run_pipeline(config)
    print(f"report: {report}")


def cmd_train(config: Config, args: argparse.Namespace, task: str) -> None:
    from cervi_ray.pipeline import loadable_checkpoint, prepare_data
    from cervi_ray.train.trainer import fit

    teacher = None
    if task == "student":
        uri = args.teacher or config.distill.teacher_checkpoint
        if uri is None:
            raise ConfigError("distill needs --teacher CHECKPOINT or distill.teacher_checkpoint in the config")
        teacher = loadable_checkpoint(uri, config.run.storage_endpoint_url)
    rows = prepare_data(config).to_dict(orient="records")
    outcome = fit(config, task, rows, teacher_checkpoint=teacher)
    print(json.dumps({
        "best_checkpoint": outcome.best_checkpoint.path,
        "latest_checkpoint": outcome.latest_checkpoint.path,
        "best_metrics": outcome.best_metrics,
    }, indent=2, default=str))


def cmd_evaluate(config: Config, args: argparse.Namespace) -> None:
    from cervi_ray.pipeline import evaluate_checkpoint_uri

    if args.split:
        config.eval.split = args.split
    output = Path(args.output) if args.output else config.run_dir / "evaluate"
    result = evaluate_checkpoint_uri(config, args.checkpoint, output)
    for set_name, metrics in result["sets"].items():
        pixel = metrics["pixel"]
        print(f"{set_name}: " + ", ".join(f"{name} Dice {values['dice']}" for name, values in pixel.items()))
    print(f"metrics: {output / 'model' / 'metrics.json'}")


def cmd_cv(config: Config, args: argparse.Namespace) -> None:
    from cervi_ray.data.splits import read_splits
    from cervi_ray.pipeline import prepare_data
    from cervi_ray.train.trainer import ensure_ray
    from cervi_ray.tune.cv import run_cv, write_cv_outputs

    records = prepare_data(config).to_dict(orient="records")
    ensure_ray(config.ray)
    table, summary = run_cv(config, records, read_splits(config.splits_file))
    paths = write_cv_outputs(config.run_dir / "cv" / config.cv.name, table, summary)
    print(paths["markdown"].read_text())
    print(f"fold table: {paths['folds']}\nsummary: {paths['summary']}\nbest parameters: {paths['best']}")


def cmd_prune(config: Config, args: argparse.Namespace) -> None:
    from cervi_ray.pipeline import best_checkpoint_of_run, loadable_checkpoint, prepare_data
    from cervi_ray.train.trainer import ensure_ray
    from cervi_ray.tune.prune import run_prune_search, write_prune_outputs

    endpoint = config.run.storage_endpoint_url
    student_uri = args.student or config.prune.student_checkpoint
    teacher_uri = args.teacher or config.prune.teacher_checkpoint
    # Default: the best checkpoints of this run name's demo training runs.
    student = loadable_checkpoint(student_uri, endpoint) if student_uri else best_checkpoint_of_run(config, "student")
    teacher = loadable_checkpoint(teacher_uri, endpoint) if teacher_uri else best_checkpoint_of_run(config, "teacher")
    if student is None:
        raise ConfigError(
            f"no student checkpoint: run the demo with run.name={config.run.name!r} first, or pass "
            "--student CHECKPOINT (or set prune.student_checkpoint)"
        )
    if teacher is None and config.prune.distill:
        raise ConfigError(
            "prune.distill is on but no teacher checkpoint was found: pass --teacher CHECKPOINT "
            "or set prune.distill=false"
        )
    rows = prepare_data(config).to_dict(orient="records")
    ensure_ray(config.ray)
    table, selection = run_prune_search(config, rows, student, teacher)
    paths = write_prune_outputs(config.run_dir / "prune" / config.prune.name, table, selection)
    print(paths["markdown"].read_text())
    print(json.dumps(selection, indent=2, default=str))


def cmd_ablation(config: Config, args: argparse.Namespace) -> None:
    from cervi_ray.ablation import run_ablation

    path = run_ablation(config)
    print(path.read_text())


def cmd_manifest(config: Config, args: argparse.Namespace) -> None:
    from cervi_ray.pipeline import prepare_data, split_counts

    manifest = prepare_data(config)
    print(json.dumps(split_counts(manifest), indent=2))
    print(f"manifest: {config.run_dir / 'manifest.parquet'}\nsplits: {config.splits_file}")


def cmd_complexity(config: Config, args: argparse.Namespace) -> None:
    from cervi_ray.models import build_model
    from cervi_ray.models.complexity import count_macs, count_parameters

    size = config.model.input_size
    for kind in ("teacher", "student"):
        model = build_model(kind, config.model, config.data.num_classes)
        macs = count_macs(model, size, config.model.in_channels)
        print(f"{kind}: {count_parameters(model) / 1e6:.2f} M parameters, {macs / 1e9:.2f} GMACs at {size} x {size}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging()
    try:
        if args.command == "datasets":  # needs no config
            catalog.run(args)
            return 0
        config = load_config(args.config, args.overrides)
        if args.command == "demo":
            cmd_demo(config, args)
        elif args.command in ("train-teacher", "distill"):
            cmd_train(config, args, "teacher" if args.command == "train-teacher" else "student")
        elif args.command == "evaluate":
            cmd_evaluate(config, args)
        elif args.command == "cv":
            cmd_cv(config, args)
        elif args.command == "prune":
            cmd_prune(config, args)
        elif args.command == "ablation":
            cmd_ablation(config, args)
        elif args.command == "export":
            export_command.run(config, args)
        elif args.command == "manifest":
            cmd_manifest(config, args)
        elif args.command == "complexity":
            cmd_complexity(config, args)
        elif args.command == "score":
            scoring_command.run(config, args)
        elif args.command == "review":
            review_command.run(config, args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
