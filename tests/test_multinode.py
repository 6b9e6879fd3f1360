"""Job files on a real multi-node Ray cluster: a head and two worker nodes started with `ray start`.

Every job file runs through the job submission API with the repository as working_dir and the
baby profile, one through the `ray job submit` CLI as the README documents. The chain is
train-teacher (CLI), then distillation while a worker node is killed, then scoring, evaluation,
export and pruning of the student that survived. Four fault tests measure what a failure costs.
Two are a killed worker node during distillation and a stopped job driver whose job is submitted
again. The others kill the inference actor while real frames are scored, and inject transient S3
errors while a distillation job stores its checkpoints in moto's S3 server on 127.0.0.1.

Jobs that do not depend on each other run at the same time, because each job starts a driver,
Ray Train or Tune actors and worker processes, which costs tens of seconds of CPU on two cores.
"""

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pandas as pd
import pytest
import requests

from cervi_ray.checkpoint import load_model, load_training_state, read_meta
from cervi_ray.config import load_config
from cervi_ray.scoring.resolution import model_resolution
from faults import (
    CHECKPOINT_FILES,
    DISTILLATION_FILES,
    check_checkpoint_bucket,
    check_each_tile_once,
    expected_tiles,
    injected,
)
from multinode import (
    RAY_CLI,
    REPO_ROOT,
    TERMINAL_JOB_STATES,
    JobRunner,
    LocalRayCluster,
    RayNode,
    SubmittedJob,
    home_token_fingerprint,
    is_running,
    tail,
    wait_until,
)

pytestmark = pytest.mark.ray

BABY_CONFIG = "configs/baby.yaml"  # relative to the job's working directory, the repository copy
JOB_TIMEOUT_S = 480  # from submission, generous because other test runs may share the machine
# Epochs of the fault-test runs. Every epoch validates and writes a checkpoint (val_every=1), so
# the checkpoint interval is one epoch. The fault comes once Ray has registered the checkpoint of
# FAULT_AFTER_EPOCH. Workers run at most two checkpoints ahead of the registered one (one report
# queued, one waiting to be queued), so epochs are left to train after the fault.
FAULT_RUN_EPOCHS = 6
FAULT_AFTER_EPOCH = 2
CHECKPOINTS_KEPT = 10  # more than FAULT_RUN_EPOCHS, so every checkpoint stays readable
TRAIN_WORKER_CLASS = "RayTrainWorker"


# Cluster and workspace.


@pytest.fixture(scope="module")
def cluster(data_root):
    """A head (1 CPU) and worker nodes worker_a and worker_b (2 CPUs each) on loopback.

    A training run needs 2 CPUs, so it fits on one worker node, and after losing a worker node it
    still fits on the other one. CERVI_RAY_DATA is part of the nodes' environment, as a pod's env.
    """
    home_token_before = home_token_fingerprint()
    # A short root under /tmp: Unix socket paths in Ray's session folders are limited to 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="cvr-", dir="/tmp"))
    cluster = LocalRayCluster(
        root,
        extra_env={
            "CERVI_RAY_DATA": str(data_root),
            # Ray Train starts an actor per run that watches for node preemption (drain) notices,
            # and nothing drains these nodes. Leaving it out saves a process per training attempt.
            "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
        },
    )
    try:
        cluster.start_head(num_cpus=1)
        cluster.add_workers([("worker_a", 2), ("worker_b", 2)])
        yield cluster
    finally:
        cluster.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    if home_token_before is not None:
        assert home_token_fingerprint() == home_token_before, "~/.ray/auth_token changed during the multi-node tests"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("multinode")


@pytest.fixture(scope="module")
def jobs(cluster, data_root) -> JobRunner:
    # env_vars carries what the cluster documentation lists for jobs, without credentials, because
    # the dashboard shows env_vars. The nodes' environment contains the fake credentials.
    runtime_env = {
        "working_dir": str(REPO_ROOT),
        "env_vars": {"CERVI_RAY_DATA": str(data_root), "AWS_DEFAULT_REGION": "us-east-1"},
    }
    return JobRunner(cluster, runtime_env)


def baby_arguments(output_dir: Path, run_name: str, *overrides: str) -> list[str]:
    """Return `--config` and `--set` options for the baby profile with outputs under output_dir.

    MLflow tracking is off unless an override turns it on, because jobs that share an output_dir
    would share one SQLite store.
    """
    arguments = ["--config", BABY_CONFIG]
    settings = [f"run.output_dir={output_dir}", f"run.name={run_name}", "tracking.enabled=false", *overrides]
    for setting in settings:
        arguments += ["--set", setting]
    return arguments


# Checkpoints as Ray Train 2.60 writes them: <output_dir>/ray/<run.name>-<label>/checkpoint_*/,
# and checkpoint_manager_snapshot.json, the controller's record of the checkpoints it registered.
# A worker writes the checkpoint folder before its report reaches the controller, which polls the
# workers every 2 s and takes one report per worker at a time. A fault in between leaves complete
# folders that Ray never registered, and a restart resumes from the newest registered one.

SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


def epochs_on_disk(run_folder: Path) -> list[int]:
    """Return the epochs of every checkpoint folder with a complete meta.json, registered or not."""
    epochs = []
    for folder in run_folder.glob("checkpoint_*"):
        try:
            epochs.append(json.loads((folder / "meta.json").read_text())["epoch"])
        except (OSError, json.JSONDecodeError):
            continue  # still being written, or cut off by a fault
    return epochs


def try_read_snapshot(run_folder: Path) -> dict[str, Any] | None:
    """Return the run's checkpoint-manager snapshot, or None while it is missing or being replaced."""
    try:
        return json.loads((run_folder / SNAPSHOT_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_snapshot(run_folder: Path) -> dict[str, Any]:
    return wait_until(lambda: try_read_snapshot(run_folder), 30, f"a readable {SNAPSHOT_FILE} in {run_folder}")


def registered_checkpoints(run_folder: Path) -> dict[int, Path]:
    """Return {epoch: folder} of the registered checkpoints that Ray keeps."""
    return {
        result["metrics"]["epoch"]: run_folder / result["checkpoint_dir_name"]
        for result in read_snapshot(run_folder)["checkpoint_results"]
    }


def wait_for_registered_checkpoint(jobs: JobRunner, job: SubmittedJob, run_folder: Path, epoch: int) -> int:
    """Wait until Ray has registered a checkpoint of `epoch` or later, and return its epoch.

    Raises AssertionError when the job ends first.
    """

    def newest_registered() -> int | None:
        status = jobs.status(job)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            raise AssertionError(
                f"job {job.job_id} ended {status} before the checkpoint of epoch {epoch}; its log "
                f"ends with:\n{tail(jobs.client.get_job_logs(job.job_id))}"
            )
        snapshot = try_read_snapshot(run_folder)
        latest = (snapshot or {}).get("latest_checkpoint_result") or {"metrics": {"epoch": 0}}
        registered = latest["metrics"]["epoch"]
        return registered if registered >= epoch else None

    return wait_until(newest_registered, JOB_TIMEOUT_S, f"a registered checkpoint of epoch {epoch} in {run_folder}")


@dataclass
class Interruption:
    """A fault injected into a training run after a checkpoint, as seen at that moment."""

    registered_epoch: int  # newest registered checkpoint just before the fault
    on_disk_epoch: int  # newest checkpoint folder once the fault had taken effect
    at: float  # time.time() of the fault


def check_resumed_run(run_folder: Path, interruption: Interruption) -> dict[str, Any]:
    """Check the finished run against the interruption, and return its final meta.json.

    The run must contain every configured epoch once, resumed from the newest checkpoint that Ray
    had registered at the fault, with the epochs before it taken over unchanged. That checkpoint
    is at least the one registered just before the fault (the controller may register one more
    in between) and at most the newest folder on disk.
    """
    checkpoints = registered_checkpoints(run_folder)
    final = read_meta(checkpoints[max(checkpoints)])
    resumed = final["metrics"]["resumed_from_epoch"]

    assert final["epoch"] == FAULT_RUN_EPOCHS
    assert [entry["epoch"] for entry in final["history"]] == list(range(1, FAULT_RUN_EPOCHS + 1))
    assert resumed >= interruption.registered_epoch, (
        f"resumed after epoch {resumed}, but epoch {interruption.registered_epoch} was registered before the fault"
    )
    assert resumed <= interruption.on_disk_epoch
    # Epochs up to the resumed one come from before the fault, unchanged.
    before = read_meta(checkpoints[resumed])
    assert final["history"][:resumed] == before["history"]
    # The best metric is carried over, then updated by the later epochs.
    assert final["best_val_dice"] >= before["best_val_dice"]
    assert final["best_val_dice"] == max(entry["val_dice"] for entry in final["history"])
    return final


def describe_loss(label: str, run_folder: Path, interruption: Interruption, final: dict[str, Any]) -> str:
    """Return a line with what the fault cost: epochs trained again and seconds of lost work."""
    checkpoints = registered_checkpoints(run_folder)
    resumed = final["metrics"]["resumed_from_epoch"]
    written = {epoch: (folder / "meta.json").stat().st_mtime for epoch, folder in checkpoints.items()}
    # Wall time of one checkpoint interval (one epoch: training, validation, checkpoint), averaged
    # over the restarted run, because checkpoints come in bursts while reports wait for the controller.
    restarted = FAULT_RUN_EPOCHS - resumed
    assert restarted >= 2, f"only {restarted} epoch(s) after the restart: too few to measure an interval"
    interval_s = (written[FAULT_RUN_EPOCHS] - written[resumed + 1]) / (restarted - 1)
    lost_s = interruption.at - written[resumed]
    recovery_s = written[resumed + 1] - interruption.at
    unregistered = interruption.on_disk_epoch - resumed
    return (
        f"{label}: fault when the checkpoint of epoch {interruption.registered_epoch} was registered. Resumed after "
        f"epoch {resumed}, the newest registered checkpoint, so {unregistered} epoch(s) written but not "
        f"registered and epoch {interruption.on_disk_epoch + 1}, in progress, ran again: {lost_s:.1f} s of "
        f"work = {lost_s / interval_s:.1f} checkpoint intervals of {interval_s:.1f} s (one epoch each, "
        f"{epoch_seconds(final['history']):.2f} s of it training). First new checkpoint {recovery_s:.1f} s "
        f"after the fault"
    )


def epoch_seconds(history: list[dict[str, Any]]) -> float:
    """Return the median training time of one epoch from the history's cumulative train_seconds."""
    seconds = [entry["train_seconds"] for entry in history]
    return statistics.median(later - earlier for earlier, later in zip(seconds, seconds[1:]))


def train_worker_nodes(cluster: LocalRayCluster, ray_job_id: str, alive_only: bool) -> list[RayNode]:
    """Return the cluster nodes that host (or hosted) Ray Train workers of the job."""
    filters = {"class_name": TRAIN_WORKER_CLASS, "job_id": ray_job_id}
    if alive_only:
        filters["state"] = "ALIVE"
    return [cluster.node_by_ray_id(row["node_id"]) for row in cluster.state_api("actors", filters)]


def optimizer_steps(folder: Path) -> int:
    """Return AdamW's step count stored in a checkpoint (the same for every parameter)."""
    state = load_training_state(folder)["optimizer"]["state"]
    steps = {int(parameter_state["step"]) for parameter_state in state.values()}
    assert len(steps) == 1, f"parameters of {folder} have different step counts: {steps}"
    return steps.pop()


# The cluster itself.


def test_cluster_has_three_nodes_behind_token_auth(cluster):
    assert cluster.node_states() == {"head": "ALIVE", "worker_a": "ALIVE", "worker_b": "ALIVE"}
    for node in cluster.nodes:
        assert node.raylet().pid > 0  # found by its node manager port, in the node's session

    without_token = requests.get(f"{cluster.dashboard_url}/api/jobs/", timeout=30)
    assert without_token.status_code == 401, without_token.text
    with_token = requests.get(f"{cluster.dashboard_url}/api/jobs/", headers=cluster.auth_headers, timeout=30)
    assert with_token.status_code == 200, with_token.text


def test_working_dir_leaves_out_ignored_files(jobs):
    listing = "import json, os; print('FILES', json.dumps(sorted(os.listdir('.'))))"
    outcome = jobs.run(["python", "-c", listing], timeout_s=120)

    files = json.loads(re.search(r"^FILES (.*)$", outcome.logs, re.MULTILINE).group(1))
    assert {"cervi_ray", "configs", "jobs", "pyproject.toml"} <= set(files)
    # .gitignore lists .venv, runs and *.egg-info, and Ray 2.60 also leaves out .git by default.
    present = [name for name in (".venv", ".git", "runs", "cervi_ray.egg-info") if (REPO_ROOT / name).exists()]
    assert present, "the checkout has none of the ignored folders, so this test checks nothing"
    for ignored in present:
        assert ignored not in files


def test_output_dir_in_working_copy_rejected(jobs):
    # Without run.output_dir the driver would write under Ray's copy of the working_dir.
    outcome = jobs.wait(jobs.start(["python", "jobs/train_teacher.py", "--config", BABY_CONFIG]), timeout_s=120)

    assert outcome.status == "FAILED"
    assert "run.output_dir" in outcome.logs
    assert "the copy of the job's working_dir that Ray deletes" in outcome.logs
    assert "Traceback" not in outcome.logs


# The chain: teacher through the CLI, distillation through a node loss, then the student's jobs.


@dataclass
class TeacherRun:
    completed: subprocess.CompletedProcess
    best_checkpoint: Path
    seconds: float


@pytest.fixture(scope="module")
def teacher_run(cluster, workspace) -> TeacherRun:
    """Train the teacher with the README's `ray job submit --working-dir .` command line."""
    command = [
        str(RAY_CLI), "job", "submit", "--address", cluster.dashboard_url, "--working-dir", ".", "--",
        "python", "jobs/train_teacher.py",
        *baby_arguments(workspace / "runs", "chain", "teacher_train.epochs=1"),
    ]
    started = time.monotonic()
    # The CLI sends the token only with RAY_AUTH_MODE=token, which the cluster's environment sets.
    completed = subprocess.run(
        command, cwd=REPO_ROOT, env=cluster.environment(), capture_output=True, text=True, timeout=JOB_TIMEOUT_S,
    )
    seconds = time.monotonic() - started
    assert completed.returncode == 0, (
        f"`ray job submit ... jobs/train_teacher.py` exited with {completed.returncode}; output ends with:\n"
        f"{tail(completed.stdout + completed.stderr)}"
    )
    found = re.search(r'"best_checkpoint": "([^"]+)"', completed.stdout)
    assert found, f"train_teacher.py printed no best_checkpoint; output ends with:\n{tail(completed.stdout)}"
    return TeacherRun(completed, Path(found.group(1)), seconds)


def test_cli_submit_trains_teacher(teacher_run, workspace):
    assert "succeeded" in teacher_run.completed.stdout + teacher_run.completed.stderr
    assert teacher_run.best_checkpoint.parent == workspace / "runs" / "ray" / "chain-teacher"
    model, meta = load_model(teacher_run.best_checkpoint)
    assert meta["model_kind"] == "teacher"
    assert meta["epoch"] == 1
    print(f"\nteacher job through the CLI: {teacher_run.seconds:.0f} s")


@dataclass
class NodeLossRun:
    """A distillation that lost a worker node, with what the test saw around the kill."""

    run_folder: Path
    victim: RayNode
    killed_pids: list[int]
    interruption: Interruption
    death_detected_s: float  # from the kill until the state API listed the node as DEAD
    nodes_at_kill: list[RayNode]  # nodes with live training workers of the job at the kill
    nodes_overall: list[RayNode]  # every node that hosted training workers of the job
    job_seconds: float


@pytest.fixture(scope="module")
def node_loss_run(cluster, jobs, workspace, teacher_run) -> NodeLossRun:
    """Distil the student and SIGKILL the worker node that trains it after an early checkpoint.

    A replacement worker node joins once the dead one is noticed, so the later tests still have
    two worker nodes. The restarted training may land on it or on the surviving worker node.
    """
    run_folder = workspace / "runs" / "ray" / "chain-student"
    job = jobs.start([
        "python", "jobs/distill.py", "--teacher", str(teacher_run.best_checkpoint),
        *baby_arguments(
            workspace / "runs", "chain", f"student_train.epochs={FAULT_RUN_EPOCHS}", "student_train.val_every=1",
            "run.max_failures=2", f"run.checkpoints_to_keep={CHECKPOINTS_KEPT}",
        ),
    ])
    ray_job_id = jobs.ray_job_id(job)
    registered_epoch = wait_for_registered_checkpoint(jobs, job, run_folder, FAULT_AFTER_EPOCH)

    nodes_at_kill = train_worker_nodes(cluster, ray_job_id, alive_only=True)
    victims = [node for node in nodes_at_kill if not node.is_head]
    assert victims, f"no training worker runs on a worker node: {[node.name for node in nodes_at_kill]}"
    victim = victims[0]
    killed_at = time.time()
    killed = cluster.kill_node(victim)
    on_disk_epoch = max(epochs_on_disk(run_folder))
    assert on_disk_epoch < FAULT_RUN_EPOCHS, "the distillation finished before its node was killed"
    wait_until(lambda: cluster.node_states().get(victim.name) == "DEAD", 60, f"node {victim.name} to be declared dead")
    death_detected_s = time.time() - killed_at
    interruption = Interruption(registered_epoch, on_disk_epoch, killed_at)

    cluster.add_workers([("worker_c", 2)])
    outcome = jobs.finish(job, JOB_TIMEOUT_S)
    return NodeLossRun(
        run_folder=run_folder,
        victim=victim,
        killed_pids=[process.pid for process in killed],
        interruption=interruption,
        death_detected_s=death_detected_s,
        nodes_at_kill=nodes_at_kill,
        nodes_overall=train_worker_nodes(cluster, ray_job_id, alive_only=False),
        job_seconds=outcome.seconds,
    )


def test_distillation_survives_worker_node_loss(node_loss_run, cluster):
    run = node_loss_run
    victim = run.victim
    assert cluster.node_states()[victim.name] == "DEAD"
    assert not [pid for pid in run.killed_pids if is_running(pid)], "processes of the killed node still run"
    # After the restart the training workers ran on another node.
    assert {node.name for node in run.nodes_overall} - {victim.name}, "training never left the killed node"

    final = check_resumed_run(run.run_folder, run.interruption)
    assert final["distilled"] is True
    trained_on = sorted({node.name for node in run.nodes_at_kill})
    print(
        f"\n{describe_loss('node loss during distillation', run.run_folder, run.interruption, final)}. "
        f"Killed {victim.name} ({len(run.killed_pids)} processes) of the training nodes {trained_on}, "
        f"declared dead after {run.death_detected_s:.1f} s. Job {run.job_seconds:.0f} s"
    )


# Jobs on the distilled student, and the independent ones, submitted together.


SEGMENTER_CLASS = "TileSegmenter"  # Ray Data names the actor class MapWorker(MapBatches(TileSegmenter))
# Real ISBI 2015 EDF frames (1024 x 1024) are scored as slides at the model's pixel size, 64 tiles
# each. About 290 tiles of the 8 frames contain cells. They reach the inference actor in blocks of
# 16 (scoring.tiles_per_read_task), so it still has most blocks to label after the kill.
SCORE_SETTINGS = [
    "scoring.tile_size=128", "scoring.overlap=0", "scoring.slide_mpp=1.0",
    "scoring.tta=[identity,hflip]", "scoring.batch_size=16",
]
FAULTS_BUCKET = "faults"
# The demo job tracks to its own MLflow store and TensorBoard folder under its run.output_dir.
DEMO_SETTINGS = [
    "teacher_train.epochs=2", "student_train.epochs=1", "eval.n_boot=10", "eval.overlays=1", "eval.latency_runs=1",
    "tracking.enabled=true",
]


def link_edf_frames(data_root: Path, folder: Path) -> int:
    """Link the ISBI 2015 EDF frames into `folder` as single-level slides and return their count."""
    folder.mkdir(parents=True)
    frames = sorted((data_root / "isbi2015" / "Training" / "EDF").glob("frame*.png"))
    assert len(frames) >= 6, f"expected the ISBI 2015 EDF frames under {data_root}, found {len(frames)}"
    for frame in frames:
        (folder / frame.name).symlink_to(frame)
    return len(frames)


@dataclass
class ActorKill:
    """What the test saw when it SIGKILLed the scoring job's inference actor."""

    actor_id: str
    pid: int
    node: str
    blocks_done: int  # blocks of tiles the actor had labelled, as far as the state API showed
    slides_committed: int  # slide summaries in the output


def labelled_blocks(cluster: LocalRayCluster, actor_id: str) -> list[dict[str, Any]]:
    """Return the finished `submit` calls of a Ray Data actor, one per input block, from the state API.

    Workers send task events to the GCS about once a second, so the newest calls may be missing.
    """
    rows = cluster.state_api("tasks", {"actor_id": actor_id, "state": "FINISHED"})
    return [row for row in rows if row["name"].endswith(".submit")]


class ScoringActorKiller(threading.Thread):
    """Kill the scoring job's inference actor after it has labelled a few blocks, in the background.

    The other jobs and the resume test go on meanwhile. result() returns the ActorKill or raises
    what went wrong, for example the job ending first.
    """

    BLOCKS_BEFORE_KILL = 3

    def __init__(self, cluster: LocalRayCluster, runner: JobRunner, job: SubmittedJob, output: Path):
        super().__init__(name="scoring-actor-killer", daemon=True)
        self.cluster, self.runner, self.job, self.output = cluster, runner, job, output
        self.kill: ActorKill | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.kill = self._kill_after_blocks()
        except BaseException as error:  # re-raised by result(), in the test's thread
            self.error = error

    def _check_running(self) -> None:
        status = self.runner.status(self.job)
        if status in TERMINAL_JOB_STATES:
            raise AssertionError(f"scoring job {self.job.job_id} ended {status} before its inference actor was killed")

    def _segmenter(self, ray_job_id: str) -> dict[str, Any] | None:
        self._check_running()
        filters = {"job_id": ray_job_id, "state": "ALIVE"}
        actors = [row for row in self.cluster.state_api("actors", filters) if SEGMENTER_CLASS in row["class_name"]]
        return actors[0] if actors else None

    def _kill_after_blocks(self) -> ActorKill:
        ray_job_id = self.runner.ray_job_id(self.job)
        actor = wait_until(
            lambda: self._segmenter(ray_job_id), JOB_TIMEOUT_S, f"the inference actor of job {self.job.job_id}",
            interval_s=0.5,
        )

        def blocks_done() -> int | None:
            self._check_running()
            done = len(labelled_blocks(self.cluster, actor["actor_id"]))
            return done if done >= self.BLOCKS_BEFORE_KILL else None

        done = wait_until(blocks_done, JOB_TIMEOUT_S, f"{self.BLOCKS_BEFORE_KILL} labelled blocks", interval_s=0.5)
        os.kill(actor["pid"], signal.SIGKILL)
        committed = len(list((self.output / "slides").glob("*.parquet")))
        node = self.cluster.node_by_ray_id(actor["node_id"])
        return ActorKill(actor["actor_id"], actor["pid"], node.name, done, committed)

    def result(self, timeout_s: float) -> ActorKill:
        self.join(timeout_s)
        if self.is_alive():
            raise AssertionError(f"the scoring actor was not killed within {timeout_s:.0f} s")
        if self.error is not None:
            raise self.error
        return self.kill


@dataclass
class ConcurrentJobs:
    submitted: dict[str, SubmittedJob]
    arguments: dict[str, list[str]]
    actor_killer: ScoringActorKiller
    student: Path  # the distilled student's checkpoint that the jobs use
    attempts_log: Path  # storage attempts and injected failures of the storage_faults job


@pytest.fixture(scope="module")
def faults_bucket(module_s3_server):
    client = boto3.client("s3", endpoint_url=module_s3_server)
    client.create_bucket(Bucket=FAULTS_BUCKET)
    return client


@pytest.fixture(scope="module")
def concurrent_jobs(cluster, jobs, workspace, data_root, node_loss_run, teacher_run, module_s3_server, faults_bucket):
    """Submit the student's jobs (score, evaluate, export, prune), cv, demo, ablation and storage_faults at once.

    The score job's inference actor is killed after it has labelled a few blocks of tiles. The
    storage_faults job distils a student with checkpoints in moto's S3, through a filesystem
    that fails the first attempts of each request.
    """
    runs = workspace / "runs"
    checkpoints = registered_checkpoints(node_loss_run.run_folder)
    student = checkpoints[max(checkpoints)]
    slides = workspace / "slides"
    link_edf_frames(data_root, slides)
    attempts_log = workspace / "storage-attempts.log"
    commands = {
        "score": [
            "python", "jobs/score.py", "--input", str(slides), "--checkpoint", str(student),
            "--output", str(workspace / "scores"), *baby_arguments(runs, "score", *SCORE_SETTINGS),
        ],
        "evaluate": [
            "python", "jobs/evaluate.py", "--checkpoint", str(student), "--output", str(workspace / "evaluate"),
            *baby_arguments(runs, "evaluate", "eval.n_boot=10", "eval.overlays=1", "eval.latency_runs=1"),
        ],
        "export": [
            "python", "jobs/export.py", "--checkpoint", str(student), "--output", str(workspace / "bundle"),
            "--no-tta-onnx", *baby_arguments(runs, "export"),
        ],
        "prune": [
            "python", "jobs/prune.py", "--student", str(student),
            *baby_arguments(
                runs, "prune", "prune.sparsities=[0.5]", "prune.structured_keep_ratio=null", "prune.distill=false",
                "prune.finetune.epochs=1", "prune.finetune.val_every=1", "prune.tolerance=1.0",
            ),
        ],
        "storage_faults": [
            "python", "tests/storage_fault_job.py", str(attempts_log), "distill", "--teacher", str(teacher_run.best_checkpoint),
            *baby_arguments(
                runs, "faults", "student_train.epochs=3", "student_train.val_every=1", "run.checkpoints_to_keep=2",
                f"run.storage_path=s3://{FAULTS_BUCKET}/ray", f"run.storage_endpoint_url={module_s3_server}",
                "run.storage_retries=3", "run.storage_retry_delay=0.05",
            ),
        ],
        # Own output folders: these create their splits file while the jobs above read theirs.
        "cv": [
            "python", "jobs/cv.py",
            *baby_arguments(
                workspace / "cv-runs", "cv", "cv.folds=[0]", "cv.sources=[isbi2014_train45]", "teacher_train.epochs=1",
            ),
        ],
        "demo": ["python", "jobs/demo.py", *baby_arguments(workspace / "demo-runs", "demo", *DEMO_SETTINGS)],
        # One worker, one epoch per training and the 8 ISBI 2015 frames: the test checks the
        # table's rows and their relations, and Ray Train's start-up per training dominates its time.
        "ablation": [
            "python", "jobs/ablation.py",
            *baby_arguments(
                workspace / "ablation-runs", "ablation", "ablation.baselines=[unet]", "prune.finetune.epochs=1",
                "prune.finetune.val_every=1", "eval.tta=[identity,hflip]", "scaling.num_workers=1",
                "teacher_train.epochs=1", "student_train.epochs=1", "eval.n_boot=10",
                "data.sources=[{name: isbi2015, kind: isbi2015, path: isbi2015/Training}]",
            ),
        ],
    }
    submitted = {name: jobs.start(arguments) for name, arguments in commands.items()}
    # The killer polls with a client of its own, because requests sessions are not thread-safe.
    killer = ScoringActorKiller(cluster, JobRunner(cluster, jobs.runtime_env), submitted["score"], workspace / "scores")
    killer.start()
    return ConcurrentJobs(submitted, commands, killer, student, attempts_log)


def test_stopped_job_resumes_from_checkpoint(cluster, jobs, workspace, concurrent_jobs):
    runs = workspace / "runs"
    run_folder = runs / "ray" / "resume-teacher"
    arguments = [
        "python", "jobs/train_teacher.py",
        *baby_arguments(
            runs, "resume", f"teacher_train.epochs={FAULT_RUN_EPOCHS}", "teacher_train.val_every=1",
            f"run.checkpoints_to_keep={CHECKPOINTS_KEPT}",
        ),
    ]
    first = jobs.start(arguments)
    first_ray_job = jobs.ray_job_id(first)
    registered_epoch = wait_for_registered_checkpoint(jobs, first, run_folder, FAULT_AFTER_EPOCH)
    stopped_at = time.time()
    stopped = jobs.stop(first)
    assert stopped.status == "STOPPED", f"the first job ended {stopped.status} instead of being stopped"
    # The training workers go with the driver: nothing trains on behind the second submission.
    wait_until(
        lambda: not train_worker_nodes(cluster, first_ray_job, alive_only=True), 60,
        f"the training workers of the stopped job {first.job_id} to exit",
    )
    interruption = Interruption(registered_epoch, max(epochs_on_disk(run_folder)), stopped_at)
    assert interruption.on_disk_epoch < FAULT_RUN_EPOCHS, "the first job finished before it was stopped"

    second = jobs.run(arguments, JOB_TIMEOUT_S)

    final = check_resumed_run(run_folder, interruption)
    resumed = final["metrics"]["resumed_from_epoch"]
    assert f"resuming after epoch {resumed}" in second.logs
    # Optimizer state: AdamW's step count runs on from the first job's instead of restarting at 0.
    checkpoints = registered_checkpoints(run_folder)
    final_folder = checkpoints[FAULT_RUN_EPOCHS]
    assert optimizer_steps(final_folder) == FAULT_RUN_EPOCHS * optimizer_steps(checkpoints[1])
    # Scheduler state: ReduceLROnPlateau counts one step per validation, that is per epoch here.
    scheduler = load_training_state(final_folder)["scheduler"]
    assert scheduler["last_epoch"] == FAULT_RUN_EPOCHS
    assert scheduler["best"] == pytest.approx(final["best_val_dice"])
    print(f"\n{describe_loss('stopped driver', run_folder, interruption, final)}. Second job {second.seconds:.0f} s")


def test_score_job_survives_actor_kill(cluster, jobs, concurrent_jobs, workspace):
    kill = concurrent_jobs.actor_killer.result(JOB_TIMEOUT_S)
    outcome = jobs.finish(concurrent_jobs.submitted["score"], JOB_TIMEOUT_S)

    # Ray restarted the killed actor in a new process, which labelled the rest of the tiles.
    blocks_by_pid = Counter(row["worker_pid"] for row in labelled_blocks(cluster, kill.actor_id))
    assert blocks_by_pid[kill.pid] >= kill.blocks_done
    after_kill = sum(count for pid, count in blocks_by_pid.items() if pid != kill.pid)
    assert after_kill > 0, "no block was labelled after the kill; the kill came too late to test anything"

    # A slide that the kill left failed is scored again by a rerun, which skips the complete ones.
    summaries = pd.read_parquet(workspace / "scores" / "slides")
    rerun = None
    if not (summaries["status"] == "ok").all():
        rerun = jobs.run(concurrent_jobs.arguments["score"], JOB_TIMEOUT_S)

    slides = workspace / "slides"
    config = load_config(REPO_ROOT / BABY_CONFIG, SCORE_SETTINGS)
    model_mpp = model_resolution(read_meta(concurrent_jobs.student), None).mpp
    counts = check_each_tile_once(workspace / "scores", expected_tiles(config.scoring, slides, model_mpp))
    print(
        f"\nscoring actor kill: SIGKILLed the inference actor (pid {kill.pid} on {kill.node}) after "
        f"{blocks_by_pid[kill.pid]} blocks of tiles, {kill.slides_committed} of {counts['slides']} slides committed; "
        f"its replacement labelled {after_kill} blocks. {counts['tiles']} tiles, each once, "
        f"{'after a rerun' if rerun else 'without a rerun'}. Job {outcome.seconds:.0f} s"
    )


def test_checkpoint_uploads_survive_storage_faults(cluster, jobs, concurrent_jobs, faults_bucket, workspace):
    job = concurrent_jobs.submitted["storage_faults"]
    outcome = jobs.finish(job, JOB_TIMEOUT_S)

    failures = injected(concurrent_jobs.attempts_log)
    checkpoint_writes = [path for path in failures["write"] if "/checkpoint_" in path]
    assert any(path.endswith("/model.safetensors") for path in checkpoint_writes)
    assert any(path.endswith("/meta.json") for path in checkpoint_writes)
    assert failures["open"], "no download met an injected failure"
    epochs = check_checkpoint_bucket(
        faults_bucket, FAULTS_BUCKET, "ray/faults-student/", workspace / "download", "student",
        files=CHECKPOINT_FILES | DISTILLATION_FILES,
    )
    assert len(epochs) == 2  # run.checkpoints_to_keep
    assert 3 in epochs
    nodes = sorted({node.name for node in train_worker_nodes(cluster, jobs.ray_job_id(job), alive_only=False)})
    print(
        f"\nstorage faults: {len(failures['write'])} failed writes ({len(checkpoint_writes)} of checkpoint files), "
        f"{len(failures['open'])} failed opens, {len(failures['read'])} failed reads, all retried; training "
        f"workers on {nodes}; the bucket holds the registered checkpoints of epochs {epochs} and nothing "
        f"half-written. Job {outcome.seconds:.0f} s"
    )


def test_evaluate_job(jobs, concurrent_jobs, workspace):
    jobs.finish(concurrent_jobs.submitted["evaluate"], JOB_TIMEOUT_S)

    metrics = json.loads((workspace / "evaluate" / "model" / "metrics.json").read_text())
    assert metrics["sets"]["isbi2014_edf_real"]["pixel"]["nucleus"]["dice"] is not None
    assert metrics["sets"]["isbi2015"]["pixel"]["cell"]["dice"] is not None


def test_export_job(jobs, concurrent_jobs, workspace):
    jobs.finish(concurrent_jobs.submitted["export"], JOB_TIMEOUT_S)

    bundle = workspace / "bundle"
    assert (bundle / "model.onnx").is_file()
    model, meta = load_model(bundle)
    assert meta["model_kind"] == "student"


def test_prune_job(jobs, concurrent_jobs, workspace):
    jobs.finish(concurrent_jobs.submitted["prune"], JOB_TIMEOUT_S)

    markdown = workspace / "runs" / "prune" / "prune" / "prune" / "prune.md"
    assert "val_dice_after_finetune" in markdown.read_text()


def test_cv_job(jobs, concurrent_jobs, workspace):
    jobs.finish(concurrent_jobs.submitted["cv"], JOB_TIMEOUT_S)

    folds = pd.read_parquet(workspace / "cv-runs" / "cv" / "cv" / "cv" / "folds.parquet")
    assert folds["fold"].tolist() == [0]
    assert folds["status"].tolist() == ["ok"]


def test_demo_job(jobs, concurrent_jobs, workspace):
    jobs.finish(concurrent_jobs.submitted["demo"], JOB_TIMEOUT_S)

    config = load_config(REPO_ROOT / BABY_CONFIG, [f"run.output_dir={workspace / 'demo-runs'}", "run.name=demo", *DEMO_SETTINGS])
    run_dir = workspace / "demo-runs" / "demo"
    text = (run_dir / "report.md").read_text()
    assert "EDF real images, nucleus Dice" in text
    assert "| teacher |" in text
    assert "| student |" in text
    for name in ("teacher", "student"):
        metrics = json.loads((run_dir / "eval" / name / "metrics.json").read_text())
        assert metrics["sets"]["isbi2014_edf_real"]["pixel"]["nucleus"]["dice"] is not None
        assert metrics["sets"]["isbi2015"]["pixel"]["cell"]["dice"] is not None
        assert metrics["complexity"]["parameters"] > 0
        assert list((run_dir / "eval" / name / "overlays").rglob("*.png"))
        assert (run_dir / f"curves_{name}.png").stat().st_size > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["training"]["teacher"]["epochs_run"] == 2
    assert summary["training"]["student"]["epochs_run"] == 1
    assert (run_dir / "manifest.parquet").is_file()

    # The demo is one MLflow parent run with the two training runs nested under it, which their
    # rank-0 workers logged from the nodes they ran on. Each training run left TensorBoard scalars
    # that TensorBoard's own reader opens.
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cervi_ray.tracking import tracking_uri

    client = MlflowClient(tracking_uri(config))
    experiment = client.get_experiment_by_name(config.tracking.experiment_name)
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["demo", "demo-student", "demo-teacher"]
    parent = runs["demo"]
    assert parent.info.status == "FINISHED"
    assert {item.path for item in client.list_artifacts(parent.info.run_id)} >= {"report.md", "summary.json"}
    for name in ("teacher", "student"):
        run = runs[f"demo-{name}"]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["task"] == name
        history = client.get_metric_history(run.info.run_id, "val_dice")
        assert [metric.step for metric in history] == list(range(1, summary["training"][name]["epochs_run"] + 1))
        events = EventAccumulator(str(workspace / "demo-runs" / "tensorboard" / f"demo-{name}"))
        events.Reload()
        assert len(events.Scalars("val_dice")) == len(history)


def test_ablation_job(jobs, concurrent_jobs, workspace):
    jobs.finish(concurrent_jobs.submitted["ablation"], JOB_TIMEOUT_S)

    folder = workspace / "ablation-runs" / "ablation" / "ablation"
    table = pd.read_parquet(folder / "ablation.parquet")
    assert list(table["model"]) == [
        "student", "student + pruning", "student + distillation", "student + pruning + distillation",
        "student + distillation + TTA", "student + pruning + distillation + TTA", "teacher (DeepLabV3+)", "U-Net",
    ]
    by_model = table.set_index("model")
    assert by_model.loc["student + pruning", "parameters"] < by_model.loc["student", "parameters"]
    assert by_model.loc["student + distillation + TTA", "tta_views"] == 2
    assert by_model.loc["student + distillation + TTA", "gmacs"] == pytest.approx(
        2 * by_model.loc["student + distillation", "gmacs"], rel=1e-6
    )
    assert "| student + pruning + distillation + TTA |" in (folder / "ablation.md").read_text()
