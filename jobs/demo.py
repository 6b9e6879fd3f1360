"""Ray job entrypoint: `cervi-ray demo`. Runs locally or under `ray job submit`.

    python jobs/demo.py --config configs/demo.yaml [--set section.key=value ...]
"""

import sys

from cervi_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
