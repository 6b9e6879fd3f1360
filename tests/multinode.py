"""A multi-node Ray cluster of `ray start` processes on this machine, and job helpers for tests.

The cluster is one head and any number of worker nodes, each a separate `ray start` with its own
ports and temp folder under one private root, all with one token for Ray's token authentication.
Nothing here touches ~/.ray, /tmp/ray or a Ray instance started elsewhere on the machine:

- Ray 2.60 reads the token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, and
  only when RAY_AUTH_MODE=token (ray._private.authentication and the C++ token loader). The
  nodes get RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH pointing into the cluster's root, with
  any inherited RAY_AUTH_TOKEN dropped. JobSubmissionClient adds the header only when its own
  process is in token mode, and never over an Authorization header the caller passes, so this
  process passes the header itself. Its own Ray settings then do not matter: a ray.init()
  cluster of other tests puts it in token mode with the token of ~/.ray/auth_token.
- `ray stop` kills every Ray process on the machine by name, other clusters included, so it is
  never called. Each node's `ray start` runs in a new session instead. Every process of that node
  keeps the session id (the raylet gives workers their own process group, not their own
  session), job drivers are children of the job supervisor actor, and every process inherits a
  marker variable. Teardown kills exactly those processes by PID.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import requests
from ray.job_submission import JobSubmissionClient

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RAY_CLI = VENV_BIN / "ray"

# Ray 2.60's `ray start` replaces a --node-ip-address of 127.0.0.1 or localhost with the host's
# routable address (ray._private.services.resolve_ip_for_localhost), and then binds the Ray client
# server and the runtime-env agents to it. 127.0.0.2 is also a loopback address, and Ray keeps it
# as given, so every address the nodes publish stays on the loopback interface.
# NOTE: the gRPC servers of the GCS, the raylets and the agents still listen on all interfaces, as
# they do under ray.init(), and so do the metrics exporters. Only the dashboard takes a host.
NODE_IP = "127.0.0.2"
# The dashboard and the job API, which this process talks to.
DASHBOARD_HOST = "127.0.0.1"

# A dead node is declared dead after period x threshold, about 5 s instead of Ray's default 15 s.
# A shorter period risks declaring a raylet dead while two busy cores starve it.
HEALTH_CHECK_ENV = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "5",
    # `ray start` gives a new raylet 30 s to register with the GCS by default. On two busy cores
    # (another Ray run beside the tests) registration took longer, and the node start failed.
    "RAY_raylet_start_wait_time_s": "120",
}

# Fake credentials, the same as conftest.FAKE_AWS_ENV. Every Ray process of the cluster inherits
# them, as pods inherit a Secret. The metadata service is off so no SDK looks for credentials or
# a region on the network.
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}

MARKER_ENV = "CERVI_RAY_TEST_CLUSTER"
TERMINAL_JOB_STATES = {"SUCCEEDED", "FAILED", "STOPPED"}
START_TIMEOUT_S = 120
LOG_TAIL_LINES = 60

T = TypeVar("T")


class PortAllocator:
    """Hand out blocks of free TCP ports, a distinct block for each node of one cluster.

    Ports come from 20000-31999: below Linux's default ephemeral range (32768-60999), where
    Ray's own processes bind port 0 while other nodes start, and above Ray's default worker
    ports (10002-19999), which a ray.init() cluster of other tests uses.
    """

    LOW, HIGH = 20000, 32000
    BLOCK = 100

    def __init__(self) -> None:
        self._random = random.Random()
        self._used_blocks: set[int] = set()

    def block(self) -> range:
        """Return a block of BLOCK consecutive ports, none handed out before, all free now."""
        blocks = (self.HIGH - self.LOW) // self.BLOCK
        for _ in range(200):
            index = self._random.randrange(blocks)
            ports = range(self.LOW + index * self.BLOCK, self.LOW + (index + 1) * self.BLOCK)
            if index not in self._used_blocks and all(_is_free(port) for port in ports):
                self._used_blocks.add(index)
                return ports
        raise RuntimeError(f"found no free block of {self.BLOCK} ports in {self.LOW}-{self.HIGH - 1}")


def _is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_until(check: Callable[[], T], timeout_s: float, description: str, interval_s: float = 0.25) -> T:
    """Poll `check` until it returns a truthy value, and return that value.

    Raises TimeoutError with `description` (what was awaited) when `timeout_s` passes first.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {description}")
        time.sleep(interval_s)


def tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


# Processes, read from /proc: the tests run on Linux only, and psutil is not a dependency.


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    parent_pid: int
    session_id: int
    command_line: str


def _read_process(pid: int) -> ProcessInfo | None:
    """Return the process's parent, session and command line, or None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        command_line = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    # The command name in brackets may contain spaces: the fixed fields start after the last ")".
    fields = stat[stat.rindex(")") + 2:].split()
    state, parent_pid, session_id = fields[0], int(fields[1]), int(fields[3])
    if state in ("Z", "X"):
        return None
    return ProcessInfo(pid, parent_pid, session_id, command_line.strip())


def is_running(pid: int) -> bool:
    """Return True unless the process has exited (zombies count as exited)."""
    return _read_process(pid) is not None


def list_processes() -> list[ProcessInfo]:
    processes = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            info = _read_process(int(entry.name))
            if info is not None:
                processes.append(info)
    return processes


def _has_marker(pid: int, marker: str) -> bool:
    # A process that sets a process title may overwrite its environment area (some Ray agents and
    # dashboard modules do), so this finds drivers and plain subprocesses, not every Ray process.
    # The session id covers those.
    try:
        environment = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"{MARKER_ENV}={marker}".encode() in environment.split(b"\0")


def select_processes(processes: list[ProcessInfo], session_ids: set[int], marker: str | None) -> list[ProcessInfo]:
    """Return the processes in `session_ids`, those carrying `marker`, and all their descendants."""
    children: dict[int, list[ProcessInfo]] = {}
    for process in processes:
        children.setdefault(process.parent_pid, []).append(process)
    selected = {
        p.pid: p for p in processes
        if p.session_id in session_ids or (marker is not None and _has_marker(p.pid, marker))
    }
    pending = list(selected.values())
    while pending:
        for child in children.get(pending.pop().pid, []):
            if child.pid not in selected:
                selected[child.pid] = child
                pending.append(child)
    return list(selected.values())


def kill_processes(processes: Iterable[ProcessInfo], timeout_s: float = 30) -> None:
    """SIGKILL the processes and wait until none of them is alive."""
    pids = [process.pid for process in processes]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_until(
        lambda: not any(is_running(pid) for pid in pids), timeout_s,
        f"killed processes {pids} to exit",
    )


# The cluster.


@dataclass
class RayNode:
    """One `ray start` node: its ports, resources, session id and log file."""

    name: str
    is_head: bool
    num_cpus: int
    resources: dict[str, float]
    ports: range  # a PortAllocator block: fixed service ports first, then the worker ports
    log_path: Path
    session_id: int = 0  # PID of its `ray start`, which ran in a new session

    @property
    def node_manager_port(self) -> int:
        return self.ports[0]

    @property
    def object_manager_port(self) -> int:
        return self.ports[1]

    def start_flags(self) -> list[str]:
        """Return the `ray start` flags that put every port of this node in its own block."""
        # Ports 7-9 of the block are the head's GCS, dashboard and Ray client server.
        worker_ports = self.ports[10:]
        return [
            f"--node-manager-port={self.node_manager_port}",
            f"--object-manager-port={self.object_manager_port}",
            f"--dashboard-agent-listen-port={self.ports[2]}",
            f"--dashboard-agent-grpc-port={self.ports[3]}",
            f"--runtime-env-agent-port={self.ports[4]}",
            f"--metrics-export-port={self.ports[5]}",
            f"--min-worker-port={worker_ports[0]}",
            f"--max-worker-port={worker_ports[-1]}",
        ]

    def processes(self) -> list[ProcessInfo]:
        return select_processes(list_processes(), {self.session_id}, marker=None)

    def raylet(self) -> ProcessInfo:
        """Return the node's raylet, found by its --node_manager_port flag."""
        flag = f"--node_manager_port={self.node_manager_port}"
        found = [
            p for p in self.processes()
            if p.command_line.split(" ", 1)[0].endswith("/raylet") and flag in p.command_line.split()
        ]
        if len(found) != 1:
            raise AssertionError(f"expected one raylet with {flag} in node {self.name}, found {len(found)}")
        return found[0]


@dataclass
class LocalRayCluster:
    """A head and worker nodes started with `ray start` on loopback addresses.

    `root` contains the token, a Ray temp folder per node (sessions, sockets, logs) and the
    `ray start` logs. Keep its path short, because Unix socket paths under it are limited to
    107 bytes.
    """

    root: Path
    extra_env: dict[str, str] = field(default_factory=dict)  # e.g. CERVI_RAY_DATA, as a pod's env
    marker: str = field(default_factory=lambda: uuid.uuid4().hex)
    nodes: list[RayNode] = field(default_factory=list)
    port_allocator: PortAllocator = field(default_factory=PortAllocator)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.token_path = self.root / "auth_token"
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)
        self.head_ports = self.port_allocator.block()

    @property
    def gcs_port(self) -> int:
        return self.head_ports[7]

    @property
    def dashboard_port(self) -> int:
        return self.head_ports[8]

    @property
    def gcs_address(self) -> str:
        return f"{NODE_IP}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{DASHBOARD_HOST}:{self.dashboard_port}"

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token_path.read_text().strip()}"}

    def environment(self) -> dict[str, str]:
        """Environment for `ray start` and the Ray CLI: this one, minus Ray and AWS settings.

        The inherited RAY_* variables are dropped because a RAY_AUTH_TOKEN or RAY_ADDRESS of the
        user would override this cluster's. The venv's bin folder comes first on PATH because
        job entrypoints run `python` from the PATH of the node.
        """
        env = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_", "AWS_"))}
        env.update(FAKE_AWS_ENV)
        env.update(HEALTH_CHECK_ENV)
        env.update(self.extra_env)
        env.update({
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            MARKER_ENV: self.marker,
        })
        return env

    # Starting nodes.

    def start_head(self, num_cpus: int = 1, object_store_mb: int = 300) -> RayNode:
        node = self._new_node("head", is_head=True, num_cpus=num_cpus, ports=self.head_ports)
        command = self._start_command(node, object_store_mb) + [
            "--head",
            f"--port={self.gcs_port}",
            f"--dashboard-host={DASHBOARD_HOST}",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={self.head_ports[9]}",
        ]
        self._run_start([(node, command)])
        return node

    def add_workers(self, specs: list[tuple[str, int]], object_store_mb: int = 300) -> list[RayNode]:
        """Start worker nodes at the same time. Each spec is a (name, CPUs) pair.

        Each node also gets a custom resource named after it, so tasks can be pinned to it.
        """
        started = []
        for name, num_cpus in specs:
            node = self._new_node(name, is_head=False, num_cpus=num_cpus, ports=self.port_allocator.block())
            command = self._start_command(node, object_store_mb) + [f"--address={self.gcs_address}"]
            started.append((node, command))
        self._run_start(started)
        return [node for node, _ in started]

    def _new_node(self, name: str, is_head: bool, num_cpus: int, ports: range) -> RayNode:
        if any(node.name == name for node in self.nodes):
            raise ValueError(f"node name {name!r} is already used in this cluster")
        resources = {} if is_head else {name: 1.0}
        return RayNode(
            name=name, is_head=is_head, num_cpus=num_cpus, resources=resources, ports=ports,
            log_path=self.root / f"start-{name}.log",
        )

    def _start_command(self, node: RayNode, object_store_mb: int) -> list[str]:
        command = [
            str(RAY_CLI), "start",
            f"--node-ip-address={NODE_IP}",
            f"--num-cpus={node.num_cpus}",
            "--num-gpus=0",
            f"--object-store-memory={object_store_mb * 1024 * 1024}",
            "--disable-usage-stats",
            # One temp folder per node: nodes that share one and start at the same time pick
            # the same raylet socket name, and the second raylet fails to bind it.
            f"--temp-dir={self.root / node.name}",
            *node.start_flags(),
        ]
        if node.resources:
            command.append(f"--resources={json.dumps(node.resources)}")
        return command

    def _run_start(self, started: list[tuple[RayNode, list[str]]]) -> None:
        """Run the `ray start` commands in parallel, each in a new session, and wait for them."""
        running = []
        for node, command in started:
            log = node.log_path.open("w")
            process = subprocess.Popen(
                command, env=self.environment(), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
            node.session_id = process.pid
            self.nodes.append(node)
            running.append((node, process, log))
        for node, process, log in running:
            try:
                code = process.wait(timeout=START_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                code = None
            log.close()
            if code != 0:
                raise RuntimeError(
                    f"`ray start` of node {node.name} failed (exit code {code}); its log "
                    f"{node.log_path} ends with:\n{tail(node.log_path.read_text())}"
                )
        names = {node.name for node, _ in started}
        wait_until(
            lambda: names <= {n for n, state in self.node_states().items() if state == "ALIVE"},
            START_TIMEOUT_S, f"nodes {sorted(names)} to register as alive",
        )

    # State.

    def state_api(self, resource: str, filters: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """Return the rows of a Ray state API listing (`nodes`, `actors`, ...) from the dashboard."""
        params: dict[str, Any] = {"limit": 1000, "detail": "true"}
        if filters:
            params["filter_keys"] = list(filters)
            params["filter_predicates"] = ["="] * len(filters)
            params["filter_values"] = list(filters.values())
        response = requests.get(
            f"{self.dashboard_url}/api/v0/{resource}", params=params, headers=self.auth_headers, timeout=30
        )
        response.raise_for_status()
        body = response.json()
        if not body.get("result"):
            raise RuntimeError(f"state API /api/v0/{resource} failed: {body.get('msg')}")
        return body["data"]["result"]["result"]

    def node_states(self) -> dict[str, str]:
        """Return the state (ALIVE or DEAD) of each node of this cluster, by node name."""
        states = {}
        for row in self.state_api("nodes"):
            resources = row.get("resources_total", {})
            if row.get("is_head_node"):
                states["head"] = row["state"]
            for node in self.nodes:
                if node.name in resources:
                    states[node.name] = row["state"]
        return states

    def node_by_ray_id(self, node_id: str) -> RayNode:
        """Return the node of this cluster that has the Ray node id `node_id`, alive or dead."""
        for row in self.state_api("nodes", {"node_id": node_id}):
            resources = row.get("resources_total", {})
            for node in self.nodes:
                if (node.is_head and row.get("is_head_node")) or node.name in resources:
                    return node
        raise LookupError(f"Ray node {node_id} is not a node of this cluster")

    # Faults and teardown.

    def kill_node(self, node: RayNode) -> list[ProcessInfo]:
        """SIGKILL the node's raylet, then every other process of the node, and return them all.

        For Ray this is a machine failure: nothing shuts down cleanly.
        """
        raylet = node.raylet()
        others = [p for p in node.processes() if p.pid != raylet.pid]
        kill_processes([raylet])
        kill_processes(others)
        return [raylet, *others]

    def shutdown(self) -> None:
        """Kill every process of this cluster: the nodes' sessions, their descendants and marked ones."""
        processes = select_processes(list_processes(), {node.session_id for node in self.nodes}, self.marker)
        kill_processes(processes)


def home_token_fingerprint() -> str | None:
    """Return a SHA-256 of ~/.ray/auth_token, or None when the file does not exist."""
    path = Path.home() / ".ray" / "auth_token"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


# Jobs.


@dataclass
class SubmittedJob:
    job_id: str  # the submission id
    arguments: list[str]
    submitted_at: float  # time.monotonic() at submission


@dataclass
class JobOutcome:
    job_id: str
    status: str
    logs: str
    seconds: float  # from submission to the end state


class JobRunner:
    """Submit entrypoints through the job submission API and wait for them with a timeout."""

    def __init__(self, cluster: LocalRayCluster, runtime_env: dict[str, Any]):
        self.runtime_env = runtime_env
        self.client = JobSubmissionClient(cluster.dashboard_url, headers=cluster.auth_headers)

    def start(self, arguments: list[str]) -> SubmittedJob:
        job_id = self.client.submit_job(entrypoint=shlex.join(arguments), runtime_env=self.runtime_env)
        return SubmittedJob(job_id, arguments, time.monotonic())

    def status(self, job: SubmittedJob) -> str:
        return str(self.client.get_job_status(job.job_id).value)

    def ray_job_id(self, job: SubmittedJob) -> str:
        """Return the Ray job id (hex) of the job's driver, by which the state API filters actors."""
        def driver_job_id() -> str | None:
            return self.client.get_job_info(job.job_id).job_id

        return wait_until(driver_job_id, START_TIMEOUT_S, f"the driver of job {job.job_id} to connect")

    def wait(self, job: SubmittedJob, timeout_s: float) -> JobOutcome:
        """Wait for the job to end. On timeout, stop it and raise with the end of its logs."""
        remaining = timeout_s - (time.monotonic() - job.submitted_at)

        def end_state() -> str | None:
            status = self.status(job)
            return status if status in TERMINAL_JOB_STATES else None

        try:
            status = wait_until(end_state, max(remaining, 1.0), f"job {job.job_id}", interval_s=0.5)
        except TimeoutError:
            logs = self.client.get_job_logs(job.job_id)
            self.client.stop_job(job.job_id)
            raise AssertionError(
                f"job {job.job_id} `{shlex.join(job.arguments)}` did not finish within "
                f"{timeout_s:.0f} s of its submission and was stopped; its log ends with:\n{tail(logs)}"
            ) from None
        seconds = time.monotonic() - job.submitted_at
        return JobOutcome(job.job_id, status, self.client.get_job_logs(job.job_id), seconds)

    def finish(self, job: SubmittedJob, timeout_s: float) -> JobOutcome:
        """Wait for the job and raise, with the end of its logs, unless it succeeded."""
        outcome = self.wait(job, timeout_s)
        if outcome.status != "SUCCEEDED":
            raise AssertionError(
                f"job {job.job_id} `{shlex.join(job.arguments)}` ended {outcome.status} after "
                f"{outcome.seconds:.0f} s; its log ends with:\n{tail(outcome.logs)}"
            )
        return outcome

    def run(self, arguments: list[str], timeout_s: float) -> JobOutcome:
        return self.finish(self.start(arguments), timeout_s)

    def stop(self, job: SubmittedJob, timeout_s: float = 60) -> JobOutcome:
        """Stop the job (SIGTERM to the driver, SIGKILL 3 s later) and wait for its end state."""
        self.client.stop_job(job.job_id)
        stopping = SubmittedJob(job.job_id, job.arguments, time.monotonic())
        return self.wait(stopping, timeout_s)
