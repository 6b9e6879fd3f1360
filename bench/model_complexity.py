"""Parameters, MACs and CPU forward time per image for the teacher and student of a profile.

    python bench/model_complexity.py --config configs/full.yaml [--size 512] [--runs 3] [--threads 2]

Prints one Markdown table row per model; docs/benchmarks.md records the results.
"""

import argparse
import platform

import torch

from cervi_ray.config import load_config
from cervi_ray.models import build_model
from cervi_ray.models.complexity import count_macs, count_parameters, time_per_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/full.yaml")
    parser.add_argument("--size", type=int, help="input side in pixels (default: model.input_size)")
    parser.add_argument("--runs", type=int, default=3, help="timed forward passes per model")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    model_config = config.model.model_copy(
        update={"teacher": config.model.teacher.model_copy(update={"encoder_weights": None})}
    )
    size = args.size or model_config.input_size
    print(f"{args.config}: {size} x {size}, {args.threads} threads, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, device {args.device}")
    print("| model | parameters (M) | GMACs | seconds per image (median) |")
    print("| --- | --- | --- | --- |")
    rows = {}
    for kind in ("teacher", "student"):
        model = build_model(kind, model_config, config.data.num_classes).to(args.device).eval()
        macs = count_macs(model, size)
        seconds = time_per_image(model, size, runs=args.runs)
        rows[kind] = (count_parameters(model), macs, seconds)
        print(f"| {kind} | {rows[kind][0] / 1e6:.2f} | {macs / 1e9:.2f} | {seconds:.3f} |")
    teacher, student = rows["teacher"], rows["student"]
    print(f"student / teacher: parameters {student[0] / teacher[0]:.3f}, MACs {student[1] / teacher[1]:.3f}, "
          f"time {student[2] / teacher[2]:.3f}")


if __name__ == "__main__":
    main()
