"""Ray job entrypoint: `cervi-ray ablation`. Runs locally or under `ray job submit`.

    python jobs/ablation.py --config configs/demo.yaml [--set section.key=value ...]
"""

import sys

from cervi_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["ablation", *sys.argv[1:]]))
