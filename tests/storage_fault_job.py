"""Job entrypoint for tests: a cervi-ray command whose checkpoint storage fails transiently.

    python tests/storage_fault_job.py ATTEMPTS_LOG <cervi-ray command and options>

The faults are those of faults.faulty_filesystem, with every attempt logged to ATTEMPTS_LOG. The
job's driver installs them before the command runs, so the command and Ray Train work as they do
in a normal job, and Ray pickles the faulty filesystem to the controller and the workers.
"""

import sys
from pathlib import Path

from cervi_ray.cli import main
from cervi_ray.train import trainer
from faults import faulty_storage_resolver  # this script's folder is on sys.path

if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(f"usage: {sys.argv[0]} ATTEMPTS_LOG COMMAND [OPTIONS ...]")
    attempts_log, *arguments = sys.argv[1:]
    trainer.resolve_storage = faulty_storage_resolver(trainer.resolve_storage, Path(attempts_log))
    sys.exit(main(arguments))
