"""Ray job entrypoint: `cervi-ray cv`. Runs locally or under `ray job submit`.

    python jobs/cv.py --config configs/demo.yaml [--set section.key=value ...]
"""

import sys

from cervi_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["cv", *sys.argv[1:]]))
