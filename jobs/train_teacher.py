"""Ray job entrypoint: `cervi-ray train-teacher`. Runs locally or under `ray job submit`.

    python jobs/train_teacher.py --config configs/demo.yaml [--set section.key=value ...]
"""

import sys

from cervi_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-teacher", *sys.argv[1:]]))
