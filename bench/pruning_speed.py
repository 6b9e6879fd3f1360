"""Parameters, MACs and CPU forward time of the student before and after structured pruning.

    python bench/pruning_speed.py [--config configs/full.yaml] [--keep-ratio 0.5] [--runs 3] [--threads 2]

Builds the student of the profile with random weights (timing does not depend on the values),
measures it, prunes it with prune_student_structured and measures it again. Prints a Markdown
table. Times are medians over --runs forward passes of one image of model.input_size pixels.
"""

import argparse
import platform

import torch

from cervi_ray.config import load_config
from cervi_ray.models import build_student
from cervi_ray.models.complexity import count_macs, count_parameters, time_per_image
from cervi_ray.pruning import prune_student_structured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/full.yaml")
    parser.add_argument("--keep-ratio", type=float, default=0.5, help="fraction of units kept, in (0, 1]")
    parser.add_argument("--runs", type=int, default=3, help="timed forward passes per model")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = load_config(args.config)
    size = config.model.input_size
    model = build_student(config.model, num_classes=config.data.num_classes).eval()
    print(f"{args.config}: student, {size} x {size}, keep_ratio {args.keep_ratio}, {args.threads} threads, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}")
    print("| student | parameters (M) | GMACs | seconds per image (median) |")
    print("| --- | --- | --- | --- |")

    rows = {}
    for label in ("original", "pruned"):
        if label == "pruned":
            prune_student_structured(model, args.keep_ratio)
        parameters = count_parameters(model)
        macs = count_macs(model, size)
        seconds = time_per_image(model, size, runs=args.runs)
        rows[label] = (parameters, macs, seconds)
        print(f"| {label} | {parameters / 1e6:.2f} | {macs / 1e9:.2f} | {seconds:.3f} |")

    original, pruned = rows["original"], rows["pruned"]
    print(f"pruned / original: parameters {pruned[0] / original[0]:.3f}, MACs {pruned[1] / original[1]:.3f}, "
          f"time {pruned[2] / original[2]:.3f}")


if __name__ == "__main__":
    main()
