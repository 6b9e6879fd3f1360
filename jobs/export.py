"""Ray job entrypoint: `cervi-ray export`. Builds a model bundle from a checkpoint.

    python jobs/export.py --checkpoint CKPT --output BUNDLE [--metrics METRICS_JSON] [--archive]
"""

import sys

from cervi_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
