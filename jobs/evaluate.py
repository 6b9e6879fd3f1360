"""Ray job entrypoint: `cervi-ray evaluate`. Runs locally or under `ray job submit`.

    python jobs/evaluate.py --config configs/demo.yaml [--set section.key=value ...]
"""

import sys

from cervi_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
