"""Ray job entrypoint: `cervi-ray score`. Runs locally or under `ray job submit`.

    python jobs/score.py --config configs/demo.yaml --input SLIDES --checkpoint CHECKPOINT --output RESULTS
"""

import sys

from cervi_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
