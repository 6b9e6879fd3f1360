"""Ray job entrypoint: `cervi-ray prune`. Runs locally or under `ray job submit`.

    python jobs/prune.py --config configs/demo.yaml [--set section.key=value ...]
"""

import sys

from cervi_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["prune", *sys.argv[1:]]))
