"""Ray job entrypoint: `cervi-ray distill`. Runs locally or under `ray job submit`.

    python jobs/distill.py --config configs/demo.yaml [--set section.key=value ...]
"""

import sys

from cervi_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["distill", *sys.argv[1:]]))
