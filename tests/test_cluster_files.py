"""Cluster deployment files, checked statically: no Kubernetes cluster, AWS account or Docker engine.

Every YAML under cluster/ parses. RayCluster and RayJob manifests carry the ray.io/v1 fields that
KubeRay validates (head and worker groups, resources, replica bounds, GPU limits, token
authentication). Each RayJob entrypoint names a real job file, config and config keys, parses
with the job's command line and fits the cluster it runs on. The AWS launcher config passes Ray's
own schema and checks. The Dockerfile builds from the pinned Ray release as a non-root user, and
no file contains credentials.

Each check returns a list of problems that name the file and the field, so one failing test
lists everything wrong with a file. The guard tests at the end feed the checks broken documents
to show that they catch what they are written for.
"""

import contextlib
import copy
import io
import json
import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from cervi_ray.cli import build_parser
from cervi_ray.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
LAUNCHER_CONFIG = CLUSTER / "aws" / "cluster.yaml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
CONSTRAINTS = REPO / "constraints.txt"
CLUSTER_DOC = REPO / "docs" / "cluster.md"

YAML_FILES = sorted(CLUSTER.rglob("*.yaml")) + sorted(CLUSTER.rglob("*.yml"))
KUBERAY_FILES = sorted(KUBERAY.glob("*.yaml"))
RAYJOB_FILES = sorted(KUBERAY.glob("rayjob-*.yaml"))
# Files that could leak credentials into the repository or an image layer.
SCANNED_FILES = sorted(path for path in CLUSTER.rglob("*") if path.is_file()) + [
    DOCKERFILE,
    DOCKERIGNORE,
    CLUSTER_DOC,
]

RAY_API_VERSION = "ray.io/v1"
CLUSTER_SELECTOR_KEY = "ray.io/cluster"  # KubeRay reads the selected cluster's name from this key
MAX_RAYJOB_NAME = 47  # KubeRay: the RayCluster name limit (53) minus the 6 characters it appends
DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MIN_TOKEN_AUTH_RAY = (2, 52, 0)  # KubeRay rejects authOptions.mode token below this rayVersion
GPU_RESOURCE = "nvidia.com/gpu"
KNOWN_KINDS = ("RayCluster", "RayJob", "Secret", "PersistentVolumeClaim")
REQUIRED_JOB_FILES = {"jobs/train_teacher.py", "jobs/distill.py", "jobs/cv.py", "jobs/score.py"}

SECRET_ENV_NAMES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN"}
ACCESS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")
SECRET_ASSIGNMENT = re.compile(
    r"(?i)\b(aws_secret_access_key|aws_access_key_id|aws_session_token|ray_auth_token)\b"
    r"[\"']?\s*[:=]\s*[\"']?([^\s\"',}]*)"
)
PLACEHOLDER = re.compile(r"^<[^<>]+>$")
# Shell operators that an unquoted <placeholder> turns into (redirections, pipes, lists).
SHELL_OPERATOR = re.compile(r"^[();<>|&]+$")
SECRET_LIKE_PATHS = re.compile(
    r"(^|/)(\.env(\..*)?|\.aws|credentials|id_rsa\w*|auth_token|secret\.ya?ml|.*\.(pem|key))$"
)
DOCKERIGNORE_REQUIRED = (".git", ".venv", "runs", ".env", "*.pem", ".aws")

WORLD_CIDRS = {"0.0.0.0/0", "::/0"}  # open to the world in an AWS security group rule
RAY_PORTS = (6379, 8265, 10001)  # GCS, dashboard and job API, Ray Client
PROJECT_INSTALL = "pip install -c constraints.txt -e ."
LAUNCHER_REQUIRED_KEYS = (
    "cluster_name",
    "max_workers",
    "provider",
    "auth",
    "available_node_types",
    "head_node_type",
    "file_mounts",
    "setup_commands",
)


# ---------------------------------------------------------------------------------------------
# Shared helpers


def relative(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def load_documents(path: Path) -> list[Any]:
    """Parse every YAML document of a file and drop empty ones (a trailing ---)."""
    with path.open() as stream:
        return [document for document in yaml.safe_load_all(stream) if document is not None]


def ray_version_pin() -> str:
    match = re.search(r"^ray==(\S+)$", CONSTRAINTS.read_text(), re.MULTILINE)
    if match is None:
        raise AssertionError(f"{relative(CONSTRAINTS)}: no ray==<version> pin")
    return match[1]


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


_BINARY_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL_SUFFIXES = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}


def parse_quantity(value: Any) -> float:
    """Parse a Kubernetes resource quantity ("7", "500m", "28Gi", "8G") into a plain number."""
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([A-Za-z]*)", str(value).strip())
    if match is None:
        raise ValueError(f"{value!r} is not a Kubernetes quantity")
    number, suffix = float(match[1]), match[2]
    if suffix in _BINARY_SUFFIXES:
        return number * _BINARY_SUFFIXES[suffix]
    if suffix in _DECIMAL_SUFFIXES:
        return number * _DECIMAL_SUFFIXES[suffix]
    raise ValueError(f"{value!r} has an unknown suffix {suffix!r}")


def is_reference(value: str) -> bool:
    """Tell whether a value names a secret instead of containing it: empty, <placeholder> or $VAR."""
    return value == "" or value.startswith("$") or value.startswith("<")


def find_credentials(text: str, where: str) -> list[str]:
    """Find literal credentials in a file's text: access key ids, private keys, secret values."""
    problems = []
    for number, line in enumerate(text.splitlines(), start=1):
        if ACCESS_KEY_ID.search(line):
            problems.append(f"{where}:{number}: literal AWS access key id; use a Secret or an instance role")
        if PRIVATE_KEY.search(line):
            problems.append(f"{where}:{number}: literal private key")
        for match in SECRET_ASSIGNMENT.finditer(line):
            if not is_reference(match[2]):
                problems.append(
                    f"{where}:{number}: {match[1]} contains a literal value; reference a Secret "
                    f"(secretKeyRef, envFrom) or use a <placeholder>"
                )
    return problems


# ---------------------------------------------------------------------------------------------
# KubeRay manifests


def pod_templates(cluster_spec: dict) -> list[tuple[str, dict]]:
    """Return (field, pod template) pairs for the head group and every worker group of a RayClusterSpec."""
    templates = []
    head = cluster_spec.get("headGroupSpec")
    if isinstance(head, dict):
        templates.append(("headGroupSpec.template", head.get("template") or {}))
    for index, group in enumerate(cluster_spec.get("workerGroupSpecs") or []):
        if isinstance(group, dict):
            name = group.get("groupName", index)
            templates.append((f"workerGroupSpecs[{name}].template", group.get("template") or {}))
    return templates


def ray_container(template: dict) -> dict:
    """Return the Ray container of a pod template, the first one as KubeRay expects."""
    containers = (template.get("spec") or {}).get("containers") or []
    return containers[0] if containers and isinstance(containers[0], dict) else {}


def limits_of(group: dict) -> dict:
    return (ray_container(group.get("template") or {}).get("resources") or {}).get("limits") or {}


def pod_capacity(group: dict) -> tuple[float, float]:
    """Return the Ray CPUs and GPUs of one pod of a group: rayStartParams win over container limits."""
    params = group.get("rayStartParams") or {}
    limits = limits_of(group)
    cpus = float(params["num-cpus"]) if "num-cpus" in params else parse_quantity(limits.get("cpu", 0))
    gpus = float(params["num-gpus"]) if "num-gpus" in params else parse_quantity(limits.get(GPU_RESOURCE, 0))
    return cpus, gpus


def check_resources(container: dict, container_field: str) -> list[str]:
    """Check requests and limits: the scheduler places pods by requests, KubeRay advertises limits to Ray."""
    problems = []
    resources = container.get("resources") or {}
    for kind in ("requests", "limits"):
        values = resources.get(kind)
        if not isinstance(values, dict):
            problems.append(f"{container_field}.resources.{kind}: missing")
            continue
        for name in ("cpu", "memory"):
            if name not in values:
                problems.append(f"{container_field}.resources.{kind}.{name}: missing")
                continue
            try:
                parse_quantity(values[name])
            except ValueError as error:
                problems.append(f"{container_field}.resources.{kind}.{name}: {error}")
    requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
    if GPU_RESOURCE in requests and requests.get(GPU_RESOURCE) != limits.get(GPU_RESOURCE):
        problems.append(
            f"{container_field}.resources: requests and limits of {GPU_RESOURCE} differ "
            f"({requests.get(GPU_RESOURCE)!r} vs {limits.get(GPU_RESOURCE)!r}); Kubernetes requires them equal"
        )
    return problems


def check_shared_memory(group: dict, field: str) -> list[str]:
    """Check that /dev/shm is a memory-backed emptyDir that fits the object store, which lives there."""
    params = group.get("rayStartParams") or {}
    template = group.get("template") or {}
    container = ray_container(template)
    volumes = {
        volume.get("name"): volume
        for volume in (template.get("spec") or {}).get("volumes") or []
        if isinstance(volume, dict)
    }
    mounts = {mount.get("mountPath"): mount for mount in container.get("volumeMounts") or [] if isinstance(mount, dict)}
    empty_dir = (volumes.get((mounts.get("/dev/shm") or {}).get("name")) or {}).get("emptyDir")
    if not isinstance(empty_dir, dict) or empty_dir.get("medium") != "Memory":
        return [
            f"{field}.template.spec.containers[0].volumeMounts: /dev/shm must mount an emptyDir with "
            f"medium: Memory (a container's default /dev/shm is too small for the object store)"
        ]
    if "object-store-memory" not in params:
        return []

    try:
        store_bytes = float(params["object-store-memory"])
        shm_bytes = parse_quantity(empty_dir.get("sizeLimit", math.inf))
        memory_bytes = parse_quantity(limits_of(group).get("memory", math.inf))
    except ValueError as error:
        return [f"{field}: invalid object store or shared memory size: {error}"]
    problems = []
    if store_bytes > shm_bytes:
        problems.append(
            f"{field}.rayStartParams.object-store-memory: {store_bytes:.0f} bytes do not fit in the /dev/shm "
            f"sizeLimit {empty_dir.get('sizeLimit')}"
        )
    if store_bytes >= memory_bytes:
        problems.append(
            f"{field}.rayStartParams.object-store-memory: {store_bytes:.0f} bytes leave no room under "
            f"limits.memory {limits_of(group).get('memory')}"
        )
    return problems


def check_credentials_source(template: dict, field: str) -> list[str]:
    """Check that credentials come from a Secret (envFrom, secretKeyRef) or a service-account role."""
    pod_spec = template.get("spec") or {}
    container = ray_container(template)
    env = [entry for entry in container.get("env") or [] if isinstance(entry, dict)]
    problems = [
        f"{field}.spec.containers[0].env.{entry['name']}: inline value; use valueFrom.secretKeyRef or envFrom "
        f"with a Secret"
        for entry in env
        if entry.get("name") in SECRET_ENV_NAMES and "value" in entry
    ]
    from_secret = any(
        isinstance(source, dict) and "secretRef" in source for source in container.get("envFrom") or []
    ) or any("secretKeyRef" in (entry.get("valueFrom") or {}) for entry in env)
    if not from_secret and not pod_spec.get("serviceAccountName"):
        problems.append(
            f"{field}.spec: no object-storage credentials: add envFrom.secretRef (a Secret) or "
            f"serviceAccountName (a service-account role such as IRSA)"
        )
    return problems


def check_group(group: dict, field: str) -> list[str]:
    """Check one head or worker group: start parameters, resources, /dev/shm, credentials, data, user."""
    problems = []
    params = group.get("rayStartParams")
    if not isinstance(params, dict):
        problems.append(f"{field}.rayStartParams: missing; KubeRay requires the map (it may be empty)")
        params = {}
    for key, value in params.items():
        if not isinstance(value, str):
            problems.append(
                f"{field}.rayStartParams.{key}: must be a string (the CRD field is map[string]string), "
                f"got {value!r}; quote it"
            )

    template = group.get("template") or {}
    container = ray_container(template)
    container_field = f"{field}.template.spec.containers[0]"
    if not container:
        problems.append(f"{container_field}: missing; KubeRay runs Ray in the first container")
        return problems
    if not container.get("image"):
        problems.append(f"{container_field}.image: missing")
    problems += check_resources(container, container_field)
    problems += check_shared_memory(group, field)
    problems += check_credentials_source(template, f"{field}.template")

    # The data folder named by CERVI_RAY_DATA must be mounted on every pod that reads images.
    mount_paths = {mount.get("mountPath") for mount in container.get("volumeMounts") or [] if isinstance(mount, dict)}
    for entry in container.get("env") or []:
        if isinstance(entry, dict) and entry.get("name") == "CERVI_RAY_DATA" and entry.get("value") not in mount_paths:
            problems.append(
                f"{container_field}.env.CERVI_RAY_DATA: {entry.get('value')!r} is not a volumeMount of this "
                f"container, so the image paths that the driver resolves would not exist here"
            )

    pod_security = (template.get("spec") or {}).get("securityContext") or {}
    security = {**pod_security, **(container.get("securityContext") or {})}
    if security.get("runAsNonRoot") is not True:
        problems.append(f"{field}.template.spec.securityContext.runAsNonRoot: must be true")
    return problems


def check_worker_group(group: Any, index: int, prefix: str) -> list[str]:
    """Check a worker group: the group fields, the autoscaler bounds and the GPU limit of a GPU group."""
    if not isinstance(group, dict):
        return [f"{prefix}.workerGroupSpecs[{index}]: not a mapping"]
    name = group.get("groupName")
    field = f"{prefix}.workerGroupSpecs[{name or index}]"
    problems = [] if name else [f"{field}.groupName: missing"]
    problems += check_group(group, field)

    minimum, maximum, replicas = group.get("minReplicas"), group.get("maxReplicas"), group.get("replicas")
    if not all(isinstance(value, int) and not isinstance(value, bool) for value in (minimum, maximum)):
        problems.append(
            f"{field}.minReplicas/maxReplicas: both must be integers (the autoscaler's bounds), "
            f"got {minimum!r} and {maximum!r}"
        )
    elif not 0 <= minimum <= maximum:
        problems.append(f"{field}.minReplicas: {minimum} must be between 0 and maxReplicas ({maximum})")
    elif replicas is not None and not minimum <= replicas <= maximum:
        problems.append(
            f"{field}.replicas: {replicas} is outside [minReplicas, maxReplicas] = [{minimum}, {maximum}]"
        )

    if "gpu" in str(name).lower() and GPU_RESOURCE not in limits_of(group):
        problems.append(
            f"{field}.template.spec.containers[0].resources.limits: a GPU group needs {GPU_RESOURCE} "
            f"(the device plugin assigns GPUs only to pods that request them)"
        )
    return problems


def check_ray_cluster_spec(spec: Any, where: str, prefix: str, ray_version: str) -> list[str]:
    """Check a RayClusterSpec, of a RayCluster or embedded in a RayJob, against KubeRay's rules."""
    if not isinstance(spec, dict):
        return [f"{where}: {prefix}: missing or not a mapping"]
    problems = []
    if spec.get("rayVersion") != ray_version:
        problems.append(
            f"{prefix}.rayVersion: must equal the Ray pin of constraints.txt ({ray_version}), "
            f"got {spec.get('rayVersion')!r}"
        )
    if (spec.get("authOptions") or {}).get("mode") != "token":
        problems.append(
            f"{prefix}.authOptions.mode: must be 'token' because Ray 2.60 does not enable token "
            f"authentication for clusters started with `ray start`"
        )
    elif version_tuple(str(spec.get("rayVersion", "0"))) < MIN_TOKEN_AUTH_RAY:
        problems.append(f"{prefix}.rayVersion: token authentication needs Ray 2.52.0 or newer")
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append(f"{prefix}.enableInTreeAutoscaling: must be true so worker groups scale between their bounds")

    # Head: its groups fields, and a dashboard that stays inside the Kubernetes cluster.
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        problems.append(f"{prefix}.headGroupSpec: missing")
    else:
        problems += check_group(head, f"{prefix}.headGroupSpec")
        service_type = head.get("serviceType", "ClusterIP")
        dashboard_host = (head.get("rayStartParams") or {}).get("dashboard-host", "0.0.0.0")
        if service_type != "ClusterIP" and dashboard_host != "127.0.0.1":
            problems.append(
                f"{prefix}.headGroupSpec.serviceType: {service_type} exposes the dashboard and job API "
                f"(dashboard-host {dashboard_host}); use ClusterIP with port-forward or an authenticated ingress"
            )
        if head.get("enableIngress"):
            problems.append(f"{prefix}.headGroupSpec.enableIngress: creates an unauthenticated ingress; remove it")

    # Workers: at least one group, all on the head's image.
    workers = spec.get("workerGroupSpecs")
    if not isinstance(workers, list) or not workers:
        problems.append(f"{prefix}.workerGroupSpecs: missing; add at least one worker group")
        workers = []
    images = sorted({str(ray_container(template).get("image")) for _, template in pod_templates(spec)})
    if len(images) > 1:
        problems.append(f"{prefix}: head and workers run different images {images}; Ray needs one version")
    for index, group in enumerate(workers):
        problems += check_worker_group(group, index, prefix)
    return [f"{where}: {problem}" for problem in problems]


def check_ray_cluster(document: dict, where: str, ray_version: str) -> list[str]:
    problems = []
    name = (document.get("metadata") or {}).get("name", "")
    if not DNS_1035_LABEL.match(str(name)):
        problems.append(f"{where}: metadata.name: {name!r} must be a DNS-1035 label")
    problems += check_ray_cluster_spec(document.get("spec"), where, "spec", ray_version)
    groups = [group for group in (document.get("spec") or {}).get("workerGroupSpecs") or [] if isinstance(group, dict)]
    if not any(GPU_RESOURCE in limits_of(group) for group in groups):
        problems.append(f"{where}: spec.workerGroupSpecs: no group with {GPU_RESOURCE} limits; add a GPU worker group")
    return problems


def check_cluster_selector(spec: dict, where: str, cluster_names: set[str]) -> list[str]:
    """Check a RayJob that runs on an existing RayCluster."""
    selector = spec.get("clusterSelector")
    problems = []
    if not isinstance(selector, dict) or set(selector) != {CLUSTER_SELECTOR_KEY}:
        problems.append(
            f"{where}: spec.clusterSelector: must contain only {CLUSTER_SELECTOR_KEY}: <RayCluster name>, "
            f"got {selector!r}"
        )
    elif selector[CLUSTER_SELECTOR_KEY] not in cluster_names:
        problems.append(
            f"{where}: spec.clusterSelector.{CLUSTER_SELECTOR_KEY}: {selector[CLUSTER_SELECTOR_KEY]!r} is not a "
            f"RayCluster under cluster/kuberay ({sorted(cluster_names)})"
        )
    if spec.get("shutdownAfterJobFinishes") is True:
        problems.append(
            f"{where}: spec.shutdownAfterJobFinishes: must be false with clusterSelector because KubeRay "
            f"never deletes a selected cluster"
        )
    if spec.get("backoffLimit"):
        problems.append(f"{where}: spec.backoffLimit: KubeRay rejects retries in clusterSelector mode")
    return problems


def check_ray_job(document: dict, where: str, ray_version: str, workdir: str, cluster_names: set[str]) -> list[str]:
    """Check a RayJob's own fields. check_entrypoint checks the entrypoint's command line."""
    problems = []
    spec = document.get("spec") or {}
    name = str((document.get("metadata") or {}).get("name", ""))
    if not DNS_1035_LABEL.match(name) or len(name) > MAX_RAYJOB_NAME:
        problems.append(
            f"{where}: metadata.name: {name!r} must be a DNS-1035 label of at most {MAX_RAYJOB_NAME} characters"
        )
    if not isinstance(spec.get("entrypoint"), str) or not spec["entrypoint"].strip():
        problems.append(f"{where}: spec.entrypoint: missing")

    # runtime_env: the project inside the image, which the submitter pod uploads.
    try:
        runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "")
    except yaml.YAMLError as error:
        problems.append(f"{where}: spec.runtimeEnvYAML: not valid YAML: {error}")
        runtime_env = None
    if not isinstance(runtime_env, dict) or runtime_env.get("working_dir") != workdir:
        problems.append(
            f"{where}: spec.runtimeEnvYAML: working_dir must be {workdir} (the Dockerfile's WORKDIR), "
            f"got {runtime_env!r}"
        )
    mode = spec.get("submissionMode", "K8sJobMode")
    if mode != "K8sJobMode":
        problems.append(f"{where}: spec.submissionMode: {mode} does not upload a local working_dir; use K8sJobMode")

    # Lifecycle: KubeRay's rules for shutdown, TTL and deadline.
    shutdown = spec.get("shutdownAfterJobFinishes")
    if not isinstance(shutdown, bool):
        problems.append(f"{where}: spec.shutdownAfterJobFinishes: must be set to true or false, got {shutdown!r}")
    ttl = spec.get("ttlSecondsAfterFinished", 0)
    if not isinstance(ttl, int) or ttl < 0:
        problems.append(f"{where}: spec.ttlSecondsAfterFinished: must be a non-negative integer (seconds), got {ttl!r}")
    elif ttl > 0 and shutdown is not True:
        problems.append(
            f"{where}: spec.ttlSecondsAfterFinished: KubeRay rejects it unless shutdownAfterJobFinishes is true"
        )
    deadline = spec.get("activeDeadlineSeconds")
    if deadline is not None and (not isinstance(deadline, int) or deadline <= 0):
        problems.append(f"{where}: spec.activeDeadlineSeconds: must be a positive integer (seconds), got {deadline!r}")

    # Either a cluster of its own or an existing one, never both.
    has_cluster_spec, has_selector = "rayClusterSpec" in spec, bool(spec.get("clusterSelector"))
    if has_cluster_spec == has_selector:
        problems.append(f"{where}: spec: set exactly one of rayClusterSpec and clusterSelector")
    if has_selector:
        problems += check_cluster_selector(spec, where, cluster_names)
    if has_cluster_spec:
        problems += check_ray_cluster_spec(spec["rayClusterSpec"], where, "spec.rayClusterSpec", ray_version)
    return problems


def check_secret(document: dict, where: str) -> list[str]:
    problems = []
    if "data" in document:
        problems.append(f"{where}: data: base64 values are real secrets; use stringData with <placeholders>")
    for key, value in (document.get("stringData") or {}).items():
        if not PLACEHOLDER.match(str(value)):
            problems.append(f"{where}: stringData.{key}: must be a <placeholder> in a committed file, not a value")
    return problems


def check_claim(document: dict, where: str) -> list[str]:
    spec = document.get("spec") or {}
    problems = []
    if not spec.get("accessModes"):
        problems.append(f"{where}: spec.accessModes: missing")
    if not ((spec.get("resources") or {}).get("requests") or {}).get("storage"):
        problems.append(f"{where}: spec.resources.requests.storage: missing")
    return problems


def check_kuberay_document(
    document: Any, where: str, ray_version: str, workdir: str, cluster_names: set[str]
) -> list[str]:
    """Check one manifest by its kind; a kind without checks is a problem, so none slips through."""
    if not isinstance(document, dict):
        return [f"{where}: a document is not a mapping"]
    kind = document.get("kind")
    if kind not in KNOWN_KINDS:
        return [f"{where}: kind: {kind!r} has no checks here; expected one of {KNOWN_KINDS}"]
    problems = []
    expected_api = RAY_API_VERSION if kind in ("RayCluster", "RayJob") else "v1"
    if document.get("apiVersion") != expected_api:
        problems.append(f"{where}: apiVersion: {kind} needs {expected_api}, got {document.get('apiVersion')!r}")
    if not (document.get("metadata") or {}).get("name"):
        problems.append(f"{where}: metadata.name: missing")
    if kind == "RayCluster":
        problems += check_ray_cluster(document, where, ray_version)
    elif kind == "RayJob":
        problems += check_ray_job(document, where, ray_version, workdir, cluster_names)
    elif kind == "Secret":
        problems += check_secret(document, where)
    else:
        problems += check_claim(document, where)
    return problems


def kuberay_documents() -> list[tuple[Path, dict]]:
    return [
        (path, document)
        for path in KUBERAY_FILES
        for document in load_documents(path)
        if isinstance(document, dict)
    ]


def defined_names(kind: str) -> set[str]:
    return {
        (document.get("metadata") or {}).get("name")
        for _, document in kuberay_documents()
        if document.get("kind") == kind
    }


def cluster_specs_of(document: dict) -> list[dict]:
    spec = document.get("spec") or {}
    if document.get("kind") == "RayCluster":
        return [spec]
    if document.get("kind") == "RayJob" and isinstance(spec.get("rayClusterSpec"), dict):
        return [spec["rayClusterSpec"]]
    return []


# ---------------------------------------------------------------------------------------------
# RayJob entrypoints


@dataclass
class Entrypoint:
    """A RayJob entrypoint that passed check_entrypoint, with its loaded config."""

    job_file: str
    command: str
    config: Config


def job_command(job_file: Path) -> str | None:
    """Return the `cervi-ray` command that a thin job file runs: main(["<command>", *sys.argv[1:]])."""
    match = re.search(r"main\(\[\s*\"([a-z][a-z-]*)\"", job_file.read_text())
    return match[1] if match else None


def split_options(args: list[str]) -> tuple[str | None, list[str]]:
    """Return the --config value and the --set overrides of a job command line."""
    config_path, overrides = None, []
    for index, token in enumerate(args):
        value = args[index + 1] if index + 1 < len(args) else None
        if token == "--config":
            config_path = value
        elif token.startswith("--config="):
            config_path = token.partition("=")[2]
        elif token == "--set" and value is not None:
            overrides.append(value)
        elif token.startswith("--set="):
            overrides.append(token.partition("=")[2])
    return config_path, overrides


def check_entrypoint(entrypoint: str, where: str) -> tuple[list[str], Entrypoint | None]:
    """Check `python jobs/<job>.py --config configs/<file>.yaml [--set key=value ...] [options]`."""
    field = f"{where}: spec.entrypoint"

    # The submitter runs the entrypoint through a shell: an unquoted <placeholder> is a redirection.
    lexer = shlex.shlex(entrypoint, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        operators = [token for token in lexer if SHELL_OPERATOR.match(token)]
        tokens = shlex.split(entrypoint)
    except ValueError as error:
        return [f"{field}: cannot be split like a shell command line: {error}"], None
    if operators:
        return [f"{field}: unquoted shell operators {operators}; quote arguments that contain <placeholders>"], None

    # The job file and the command it runs.
    if len(tokens) < 2 or tokens[0] not in ("python", "python3") or not re.fullmatch(r"jobs/\w+\.py", tokens[1]):
        return [f"{field}: must start with `python jobs/<job>.py`, got {entrypoint!r}"], None
    job_file = REPO / tokens[1]
    if not job_file.is_file():
        return [f"{field}: {tokens[1]} does not exist"], None
    command = job_command(job_file)
    if command is None:
        return [f"{field}: {tokens[1]} does not call cervi_ray.cli.main with a command name"], None

    # The config and every --set override, applied as the job will apply them.
    args = tokens[2:]
    config_path, overrides = split_options(args)
    if config_path is None:
        return [f"{field}: no --config configs/<file>.yaml"], None
    if not (REPO / config_path).is_file():
        return [f"{field}: --config {config_path} does not exist"], None
    problems = []
    config = None
    try:
        config = load_config(REPO / config_path, overrides)
    except ConfigError as error:
        problems.append(f"{field}: --config {config_path} with --set {overrides} does not load: {error}")
    storage = [value.partition("=")[2] for value in overrides if value.partition("=")[0] == "run.storage_path"]
    if not storage or not storage[-1].startswith("s3://"):
        problems.append(f"{field}: needs --set run.storage_path=s3://... so every node reaches the checkpoints")

    # The job's command line must accept every option, as it will on the cluster.
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            build_parser().parse_args([command, *args])
    except SystemExit:
        lines = stderr.getvalue().strip().splitlines()
        message = lines[-1] if lines else "no message"
        problems.append(f"{field}: {tokens[1]} runs `cervi-ray {command}`, which rejects these options: {message}")

    if problems or config is None:
        return problems, None
    return problems, Entrypoint(tokens[1], command, config)


def check_job_fits_cluster(entry: Entrypoint, cluster_spec: dict, where: str) -> list[str]:
    """Check that the cluster's worker groups can hold what the job requests at once.

    A Ray job whose workers, trials or actors fit on no pod waits for resources forever, so the
    resource settings of the config must match the pod sizes and maxReplicas of the worker groups.
    """
    groups = [
        (*pod_capacity(group), group.get("maxReplicas") or 0)
        for group in cluster_spec.get("workerGroupSpecs") or []
        if isinstance(group, dict)
    ]

    def slots(cpus_each: float, gpus_each: float) -> int:
        """Count how many units of (cpus_each, gpus_each) fit in the cluster at its largest.

        cpus_each is positive because the config sections reject 0 CPUs per worker, trial or actor.
        """
        total = 0
        for pod_cpus, pod_gpus, max_replicas in groups:
            per_pod = pod_cpus // cpus_each
            if gpus_each:
                per_pod = min(per_pod, pod_gpus // gpus_each)
            total += int(per_pod) * max_replicas
        return total

    config, command = entry.config, entry.command
    if command in ("cv", "prune"):
        sweep = config.cv if command == "cv" else config.prune
        needed, unit = 1, (sweep.cpus_per_trial, sweep.gpus_per_trial)
        request = f"one trial of {command}.cpus_per_trial={unit[0]}, {command}.gpus_per_trial={unit[1]}"
    elif command == "score":
        scoring = config.scoring
        needed, unit = scoring.inference_actors, (scoring.cpus_per_actor, scoring.gpus_per_actor)
        request = f"scoring.inference_actors={needed} actors of {unit[0]} CPUs and {unit[1]} GPUs"
    else:
        scaling = config.scaling
        needed, unit = scaling.num_workers, (scaling.cpus_per_worker, 1 if scaling.use_gpu else 0)
        request = f"scaling.num_workers={needed} workers of {unit[0]} CPUs and {unit[1]} GPUs"
    available = slots(*unit)
    if available < needed:
        return [
            f"{where}: workerGroupSpecs: the cluster fits {available} of the {request} that {entry.job_file} "
            f"requests; raise maxReplicas or the pod size, or lower the request"
        ]
    return []


# ---------------------------------------------------------------------------------------------
# Ray cluster launcher (AWS)


def open_ray_ports(rule: dict) -> tuple[list[int], set[str]]:
    """Return the Ray ports that a security group rule opens and the world-wide ranges it opens them to."""
    ranges = rule.get("IpRanges", []) + rule.get("Ipv6Ranges", [])
    world = {cidr.get("CidrIp") or cidr.get("CidrIpv6") for cidr in ranges} & WORLD_CIDRS
    low, high = rule.get("FromPort", -1), rule.get("ToPort", -1)
    opened = [port for port in RAY_PORTS if low == -1 or low <= port <= high]
    return (opened, world) if world else ([], set())


def check_launcher_config(config: Any, where: str) -> list[str]:
    """Check the project's rules for the launcher config, on top of Ray's schema (see the tests below)."""
    if not isinstance(config, dict):
        return [f"{where}: not a mapping"]
    problems = [f"{where}: {key}: missing" for key in LAUNCHER_REQUIRED_KEYS if key not in config]
    node_types = config.get("available_node_types") or {}
    head_type = config.get("head_node_type")
    if head_type not in node_types:
        problems.append(
            f"{where}: head_node_type: {head_type!r} is not one of available_node_types {sorted(node_types)}"
        )

    # Provider: AWS, and no security group rule that opens Ray's ports to the world.
    provider = config.get("provider") or {}
    if provider.get("type") != "aws":
        problems.append(f"{where}: provider.type: must be aws, got {provider.get('type')!r}")
    if not provider.get("region"):
        problems.append(f"{where}: provider.region: missing")
    for rule in (provider.get("security_group") or {}).get("IpPermissions") or []:
        opened, world = open_ray_ports(rule)
        if opened:
            problems.append(
                f"{where}: provider.security_group.IpPermissions: opens ports {opened} to {sorted(world)}; "
                f"reach the dashboard through `ray dashboard` instead"
            )

    # Node types: worker bounds, S3 through instance roles, and a GPU worker type.
    max_workers = config.get("max_workers", 0)
    gpu_types = []
    for name, node_type in node_types.items():
        field = f"available_node_types.{name}"
        minimum, maximum = node_type.get("min_workers", 0), node_type.get("max_workers", max_workers)
        if name != head_type and not 0 <= minimum <= maximum:
            problems.append(f"{where}: {field}.min_workers: {minimum} must be between 0 and max_workers ({maximum})")
        node_config = node_type.get("node_config") or {}
        if "IamInstanceProfile" not in node_config:
            problems.append(
                f"{where}: {field}.node_config.IamInstanceProfile: missing; S3 access must come from an "
                f"instance role, not keys"
            )
        instance_type = str(node_config.get("InstanceType", ""))
        if (node_type.get("resources") or {}).get("GPU", 0) > 0 or re.match(r"^(g|p)\d", instance_type):
            gpu_types.append(name)
    if not [name for name in gpu_types if name != head_type]:
        problems.append(f"{where}: available_node_types: no GPU worker type (a g* or p* instance, or resources.GPU)")
    if sum(node_type.get("min_workers", 0) for node_type in node_types.values()) > max_workers:
        problems.append(f"{where}: max_workers: {max_workers} is below the sum of min_workers")

    # The project install and token authentication on every node.
    docker = config.get("docker") or {}
    if not docker.get("image") and PROJECT_INSTALL not in " ".join(config.get("setup_commands") or []):
        problems.append(
            f"{where}: docker.image or setup_commands: install the project with `{PROJECT_INSTALL}` or run "
            f"the image built from the Dockerfile"
        )
    start_commands = (config.get("head_start_ray_commands") or []) + (config.get("worker_start_ray_commands") or [])
    if "RAY_AUTH_MODE=token" not in " ".join((docker.get("run_options") or []) + start_commands):
        problems.append(
            f"{where}: docker.run_options: set RAY_AUTH_MODE=token, because `ray start` leaves token "
            f"authentication off otherwise"
        )
    return problems


# ---------------------------------------------------------------------------------------------
# Dockerfile


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """Split a Dockerfile into (INSTRUCTION, arguments) pairs, joining continuations and dropping comments."""
    instructions, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # Docker skips blank and comment lines, also inside a continuation
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).strip().partition(" ")
        pending = ""
        instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def dockerfile_workdir(text: str) -> str | None:
    workdirs = [arguments for keyword, arguments in dockerfile_instructions(text) if keyword == "WORKDIR"]
    return workdirs[-1] if workdirs else None


def check_dockerfile(text: str, ray_version: str, where: str) -> list[str]:
    instructions = dockerfile_instructions(text)
    from_indexes = [index for index, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    if not from_indexes:
        return [f"{where}: FROM: missing"]
    problems = []

    # The base image of the final stage must carry the Ray release that constraints.txt pins.
    arg_defaults = {}
    for keyword, arguments in instructions[: from_indexes[0]]:
        if keyword == "ARG":
            name, _, default = arguments.partition("=")
            arg_defaults[name.strip()] = default.strip().strip("\"'")
    base = instructions[from_indexes[-1]][1].split()[0]
    base = re.sub(r"\$\{?(\w+)\}?", lambda match: arg_defaults.get(match[1], match[0]), base)
    image, _, tag = base.partition(":")
    if image != "rayproject/ray":
        problems.append(
            f"{where}: FROM: base image must be rayproject/ray:{ray_version}-py<version> to match "
            f"constraints.txt, got {base!r}"
        )
    elif not (tag == ray_version or tag.startswith(f"{ray_version}-")):
        problems.append(f"{where}: FROM: tag {tag!r} does not match ray=={ray_version} in constraints.txt")

    # The final stage: a non-root user, WORKDIR /app and the pinned install.
    final_stage = instructions[from_indexes[-1]:]
    users = [arguments for keyword, arguments in final_stage if keyword == "USER"]
    if not users:
        problems.append(f"{where}: USER: missing; the image must run as a non-root user")
    elif users[-1].split(":")[0] in ("root", "0"):
        problems.append(f"{where}: USER: the last USER is {users[-1]!r}; switch to a non-root user")
    if dockerfile_workdir(text) != "/app":
        problems.append(
            f"{where}: WORKDIR: must be /app (the RayJobs' runtime_env working_dir), got {dockerfile_workdir(text)!r}"
        )
    install_index = next(
        (
            index
            for index, (keyword, arguments) in enumerate(final_stage)
            if keyword == "RUN"
            and "pip install" in arguments
            and re.search(r"(-c|--constraint[= ])\s*constraints\.txt", arguments)
            and re.search(r"-e\s+\.(\s|$)", arguments)
        ),
        None,
    )
    if install_index is None:
        problems.append(f"{where}: RUN: no `{PROJECT_INSTALL}` (the pinned install set)")
    elif not any(
        keyword == "COPY" and ("constraints.txt" in arguments.split() or " . " in f" {arguments} ")
        for keyword, arguments in final_stage[:install_index]
    ):
        problems.append(f"{where}: COPY: constraints.txt is not copied before the pip install")

    # No credentials: no secret files copied, no secret names in ENV or ARG.
    for keyword, arguments in instructions:
        if keyword in ("COPY", "ADD"):
            sources = [word for word in arguments.split() if not word.startswith("--")][:-1]
            for source in sources:
                if SECRET_LIKE_PATHS.search(source.rstrip("/")):
                    problems.append(f"{where}: {keyword} {source}: copies a credentials file into the image")
        if keyword in ("ENV", "ARG") and arguments:
            # ENV NAME=value ..., ARG NAME[=default], or the legacy ENV NAME value.
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*=", arguments) or [arguments.split()[0]]
            for name in names:
                if name in SECRET_ENV_NAMES:
                    problems.append(f"{where}: {keyword} {name}: credentials must not be baked into the image")
    return problems


def check_dockerignore(text: str, where: str) -> list[str]:
    entries = {
        line.strip().removeprefix("**/").rstrip("/")
        for line in text.splitlines()
        if line.strip() and not line.startswith("#")
    }
    return [
        f"{where}: {pattern}: missing; `COPY . /app` would put it in the image"
        for pattern in DOCKERIGNORE_REQUIRED
        if pattern not in entries
    ]


# ---------------------------------------------------------------------------------------------
# Tests on the shipped files


def test_cluster_files_exist():
    expected = [
        KUBERAY / "raycluster.yaml",
        KUBERAY / "secret-example.yaml",
        LAUNCHER_CONFIG,
        DOCKERFILE,
        DOCKERIGNORE,
        CLUSTER_DOC,
    ]
    missing = [relative(path) for path in expected if not path.is_file()]
    assert not missing, f"missing deployment files: {missing}"
    assert len(RAYJOB_FILES) >= 4, f"expected RayJob examples cluster/kuberay/rayjob-*.yaml, found {RAYJOB_FILES}"


@pytest.mark.parametrize("path", YAML_FILES, ids=relative)
def test_yaml_parses(path):
    try:
        documents = load_documents(path)
    except yaml.YAMLError as error:
        pytest.fail(f"{relative(path)}: not valid YAML: {error}")
    assert documents, f"{relative(path)}: no YAML document"
    not_mappings = [index for index, document in enumerate(documents) if not isinstance(document, dict)]
    assert not not_mappings, f"{relative(path)}: documents {not_mappings} are not mappings"


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=relative)
def test_kuberay_manifest_fields(path):
    ray_version = ray_version_pin()
    workdir = dockerfile_workdir(DOCKERFILE.read_text())
    cluster_names = defined_names("RayCluster")
    problems = []
    for document in load_documents(path):
        problems += check_kuberay_document(document, relative(path), ray_version, workdir, cluster_names)
    assert not problems, "\n".join(problems)


def test_raycluster_defined():
    assert defined_names("RayCluster"), "cluster/kuberay: no RayCluster manifest"


def test_kuberay_references_defined():
    """Every Secret and PersistentVolumeClaim that the pods use has a manifest under cluster/kuberay."""
    secrets, claims = defined_names("Secret"), defined_names("PersistentVolumeClaim")
    problems = []
    for path, document in kuberay_documents():
        for spec in cluster_specs_of(document):
            for field, template in pod_templates(spec):
                where = f"{relative(path)}: {field}"
                pod_spec = template.get("spec") or {}
                for container in pod_spec.get("containers") or []:
                    for source in container.get("envFrom") or []:
                        name = (source.get("secretRef") or {}).get("name")
                        if name and name not in secrets:
                            problems.append(f"{where}: envFrom.secretRef {name!r} has no Secret manifest")
                    for entry in container.get("env") or []:
                        name = ((entry.get("valueFrom") or {}).get("secretKeyRef") or {}).get("name")
                        if name and name not in secrets:
                            problems.append(f"{where}: secretKeyRef {name!r} has no Secret manifest")
                for volume in pod_spec.get("volumes") or []:
                    claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
                    if claim and claim not in claims:
                        problems.append(f"{where}: claimName {claim!r} has no PersistentVolumeClaim manifest")
    assert not problems, "\n".join(problems)


def test_rayjobs_cover_jobs_and_modes():
    job_files, modes = set(), set()
    for path in RAYJOB_FILES:
        for document in load_documents(path):
            spec = document.get("spec") or {}
            job_files.update(shlex.split(spec.get("entrypoint", ""))[1:2])
            modes.update(mode for mode in ("rayClusterSpec", "clusterSelector") if mode in spec)
    assert REQUIRED_JOB_FILES <= job_files, f"no RayJob example for {sorted(REQUIRED_JOB_FILES - job_files)}"
    assert modes == {"rayClusterSpec", "clusterSelector"}, f"the RayJob examples show only {sorted(modes)}"


@pytest.mark.parametrize("path", RAYJOB_FILES, ids=relative)
def test_rayjob_entrypoint(path):
    """The entrypoint's job file, config and --set keys exist, and the job fits its cluster."""
    clusters = {
        (document.get("metadata") or {}).get("name"): document.get("spec") or {}
        for _, document in kuberay_documents()
        if document.get("kind") == "RayCluster"
    }
    problems = []
    for document in load_documents(path):
        spec = document.get("spec") or {}
        entry_problems, entry = check_entrypoint(spec.get("entrypoint", ""), relative(path))
        problems += entry_problems
        if entry is None:
            continue
        if "rayClusterSpec" in spec:
            cluster_spec, cluster_where = spec["rayClusterSpec"], f"{relative(path)}: spec.rayClusterSpec"
        else:
            name = (spec.get("clusterSelector") or {}).get(CLUSTER_SELECTOR_KEY)
            cluster_spec, cluster_where = clusters.get(name, {}), f"{relative(path)}: RayCluster {name!r}"
        problems += check_job_fits_cluster(entry, cluster_spec, cluster_where)
    assert not problems, "\n".join(problems)


def test_launcher_config_ray_schema():
    """The launcher config validates against the schema that `ray up` uses (ray-schema.json)."""
    import jsonschema
    import ray.autoscaler

    config = load_documents(LAUNCHER_CONFIG)[0]
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(config), key=lambda error: list(error.path))
    messages = [
        f"{relative(LAUNCHER_CONFIG)}: {'.'.join(map(str, error.path)) or '(top level)'}: {error.message}"
        for error in errors
    ]
    assert not messages, "\n".join(messages)


def test_launcher_config_ray_checks():
    """Ray's offline preparation and checks in `ray up`: defaults merged, node types, worker counts."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load_documents(LAUNCHER_CONFIG)[0]
    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except Exception as error:  # Ray raises ValueError, AssertionError or jsonschema errors here
        pytest.fail(f"{relative(LAUNCHER_CONFIG)}: Ray rejects the config: {type(error).__name__}: {error}")


def test_launcher_config_project_rules():
    problems = check_launcher_config(load_documents(LAUNCHER_CONFIG)[0], relative(LAUNCHER_CONFIG))
    assert not problems, "\n".join(problems)


def test_dockerfile():
    problems = check_dockerfile(DOCKERFILE.read_text(), ray_version_pin(), relative(DOCKERFILE))
    assert not problems, "\n".join(problems)


def test_dockerignore():
    problems = check_dockerignore(DOCKERIGNORE.read_text(), relative(DOCKERIGNORE))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", SCANNED_FILES, ids=relative)
def test_no_credentials(path):
    assert path.is_file(), f"{relative(path)}: missing"
    problems = find_credentials(path.read_text(), relative(path))
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------
# Guard tests: each check catches the fault it is written for


def shipped_raycluster() -> dict:
    return copy.deepcopy(load_documents(KUBERAY / "raycluster.yaml")[0])


def shipped_rayjob(name: str) -> dict:
    return copy.deepcopy(load_documents(KUBERAY / name)[0])


def shipped_launcher_config() -> dict:
    return copy.deepcopy(load_documents(LAUNCHER_CONFIG)[0])


def gpu_group(document: dict) -> dict:
    return next(group for group in document["spec"]["workerGroupSpecs"] if GPU_RESOURCE in limits_of(group))


def manifest_problems(document: dict) -> list[str]:
    return check_kuberay_document(document, "bad.yaml", ray_version_pin(), "/app", {"cervi-ray"})


def test_guard_shipped_raycluster_clean():
    assert manifest_problems(shipped_raycluster()) == []  # the baseline that the guards below break


def test_guard_min_replicas_above_max():
    document = shipped_raycluster()
    gpu_group(document)["minReplicas"] = 5  # maxReplicas is 4
    assert any("minReplicas: 5 must be between 0 and maxReplicas" in problem for problem in manifest_problems(document))


def test_guard_gpu_group_without_limit():
    document = shipped_raycluster()
    resources = ray_container(gpu_group(document)["template"])["resources"]
    del resources["limits"][GPU_RESOURCE]
    del resources["requests"][GPU_RESOURCE]
    problems = manifest_problems(document)
    assert any("a GPU group needs nvidia.com/gpu" in problem for problem in problems)
    assert any("no group with nvidia.com/gpu limits" in problem for problem in problems)


def test_guard_missing_requests():
    document = shipped_raycluster()
    del ray_container(document["spec"]["headGroupSpec"]["template"])["resources"]["requests"]
    expected = "headGroupSpec.template.spec.containers[0].resources.requests: missing"
    assert any(expected in problem for problem in manifest_problems(document))


def test_guard_integer_start_param():
    document = shipped_raycluster()
    document["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    assert any("rayStartParams.num-cpus: must be a string" in problem for problem in manifest_problems(document))


def test_guard_object_store_above_shm():
    document = shipped_raycluster()
    gpu_group(document)["rayStartParams"]["object-store-memory"] = str(16 * 2**30)  # dshm is 10Gi
    assert any("do not fit in the /dev/shm sizeLimit" in problem for problem in manifest_problems(document))


def test_guard_public_dashboard_service():
    document = shipped_raycluster()
    document["spec"]["headGroupSpec"]["serviceType"] = "LoadBalancer"
    assert any("LoadBalancer exposes the dashboard" in problem for problem in manifest_problems(document))


def test_guard_token_auth_off():
    document = shipped_raycluster()
    del document["spec"]["authOptions"]
    assert any("authOptions.mode: must be 'token'" in problem for problem in manifest_problems(document))


def test_guard_inline_credentials_env():
    document = shipped_raycluster()
    container = ray_container(document["spec"]["headGroupSpec"]["template"])
    container["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "not-a-reference"})
    assert any("env.AWS_SECRET_ACCESS_KEY: inline value" in problem for problem in manifest_problems(document))


def test_guard_no_credentials_source():
    document = shipped_raycluster()
    del ray_container(document["spec"]["headGroupSpec"]["template"])["envFrom"]
    assert any("no object-storage credentials" in problem for problem in manifest_problems(document))


def test_guard_credential_scan(tmp_path):
    key_id = "AKIA" + "Q" * 16  # built at run time so that no key-shaped literal sits in this file
    path = tmp_path / "leaky.yaml"
    path.write_text(
        f"aws_access_key_id: {key_id}\naws_secret_access_key: abc123/XYZ\nAWS_SECRET_ACCESS_KEY: <placeholder>\n"
    )
    problems = find_credentials(path.read_text(), path.name)
    assert any("leaky.yaml:1: literal AWS access key id" in problem for problem in problems)
    assert any("leaky.yaml:2: aws_secret_access_key contains a literal value" in problem for problem in problems)
    assert not any("leaky.yaml:3" in problem for problem in problems)  # placeholders are fine


def test_guard_secret_with_value():
    document = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "stringData": {"KEY": "real"}}
    assert any("stringData.KEY: must be a <placeholder>" in problem for problem in manifest_problems(document))


def test_guard_ttl_without_shutdown():
    document = shipped_rayjob("rayjob-train-teacher.yaml")
    document["spec"]["shutdownAfterJobFinishes"] = False
    assert any("ttlSecondsAfterFinished: KubeRay rejects it" in problem for problem in manifest_problems(document))


def test_guard_selector_shutdown_unknown_cluster():
    document = shipped_rayjob("rayjob-distill.yaml")
    document["spec"]["shutdownAfterJobFinishes"] = True
    document["spec"]["clusterSelector"] = {CLUSTER_SELECTOR_KEY: "no-such-cluster"}
    problems = manifest_problems(document)
    assert any("must be false with clusterSelector" in problem for problem in problems)
    assert any("'no-such-cluster' is not a RayCluster" in problem for problem in problems)


def test_guard_both_cluster_modes():
    document = shipped_rayjob("rayjob-distill.yaml")
    document["spec"]["rayClusterSpec"] = shipped_raycluster()["spec"]
    problems = manifest_problems(document)
    assert any("set exactly one of rayClusterSpec and clusterSelector" in problem for problem in problems)


def test_guard_wrong_working_dir():
    document = shipped_rayjob("rayjob-cv.yaml")
    document["spec"]["runtimeEnvYAML"] = "working_dir: .\n"
    assert any("working_dir must be /app" in problem for problem in manifest_problems(document))


def test_guard_entrypoint_missing_job_file():
    problems, _ = check_entrypoint("python jobs/no_such_job.py --config configs/demo.yaml", "bad.yaml")
    assert problems == ["bad.yaml: spec.entrypoint: jobs/no_such_job.py does not exist"]


def test_guard_entrypoint_missing_config():
    problems, _ = check_entrypoint("python jobs/cv.py --config configs/no_such.yaml", "bad.yaml")
    assert problems == ["bad.yaml: spec.entrypoint: --config configs/no_such.yaml does not exist"]


def test_guard_entrypoint_unknown_config_key():
    entrypoint = "python jobs/cv.py --config configs/cv.yaml --set run.storage_path=s3://b/p --set cv.gpu_per_trial=1"
    problems, _ = check_entrypoint(entrypoint, "bad.yaml")
    assert any("cv.gpu_per_trial" in problem and "does not load" in problem for problem in problems)


def test_guard_entrypoint_local_storage():
    entrypoint = "python jobs/cv.py --config configs/cv.yaml --set run.storage_path=/tmp/x"
    problems, _ = check_entrypoint(entrypoint, "bad.yaml")
    assert any("needs --set run.storage_path=s3://" in problem for problem in problems)


def test_guard_entrypoint_unquoted_placeholder():
    entrypoint = "python jobs/cv.py --config configs/cv.yaml --set run.storage_path=s3://<your-bucket>/x"
    problems, _ = check_entrypoint(entrypoint, "bad.yaml")
    assert any("unquoted shell operators" in problem for problem in problems)


def test_guard_entrypoint_unknown_option():
    entrypoint = "python jobs/cv.py --config configs/cv.yaml --set run.storage_path=s3://b/p --teacher s3://b/t"
    problems, _ = check_entrypoint(entrypoint, "bad.yaml")
    assert any("`cervi-ray cv`, which rejects these options" in problem for problem in problems)


def test_guard_job_larger_than_cluster():
    entrypoint = (
        "python jobs/train_teacher.py --config configs/full.yaml "
        "--set run.storage_path=s3://b/p --set scaling.num_workers=8"
    )
    problems, entry = check_entrypoint(entrypoint, "bad.yaml")
    assert problems == []
    fit = check_job_fits_cluster(entry, shipped_raycluster()["spec"], "bad.yaml")  # 4 GPU pods at most
    assert len(fit) == 1
    assert "fits 4 of the scaling.num_workers=8 workers" in fit[0]


def test_guard_launcher_head_type_undeclared():
    config = shipped_launcher_config()
    config["head_node_type"] = "ray.head.missing"
    problems = check_launcher_config(config, "bad.yaml")
    assert any("head_node_type: 'ray.head.missing' is not one of" in problem for problem in problems)


def test_guard_launcher_without_role_or_gpu():
    config = shipped_launcher_config()
    worker = config["available_node_types"]["ray.worker.gpu"]
    del worker["node_config"]["IamInstanceProfile"]
    worker["node_config"]["InstanceType"] = "m5.large"
    problems = check_launcher_config(config, "bad.yaml")
    assert any("ray.worker.gpu.node_config.IamInstanceProfile: missing" in problem for problem in problems)
    assert any("no GPU worker type" in problem for problem in problems)


def test_guard_launcher_open_dashboard_port():
    config = shipped_launcher_config()
    rule = {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
    config["provider"]["security_group"] = {"IpPermissions": [rule]}
    assert any("opens ports [8265]" in problem for problem in check_launcher_config(config, "bad.yaml"))


def test_guard_launcher_missing_keys():
    config = shipped_launcher_config()
    del config["auth"]
    del config["max_workers"]
    problems = check_launcher_config(config, "bad.yaml")
    assert "bad.yaml: auth: missing" in problems
    assert "bad.yaml: max_workers: missing" in problems


def test_guard_launcher_token_auth_off():
    config = shipped_launcher_config()
    config["docker"]["run_options"] = [option for option in config["docker"]["run_options"] if "RAY_AUTH" not in option]
    assert any("set RAY_AUTH_MODE=token" in problem for problem in check_launcher_config(config, "bad.yaml"))


def test_guard_dockerfile_root_and_wrong_tag():
    text = (
        "FROM rayproject/ray:2.9.0-py311\nWORKDIR /app\nCOPY . /app\n"
        "RUN pip install -c constraints.txt -e .\nUSER root\n"
    )
    problems = check_dockerfile(text, "2.60.0", "Dockerfile")
    assert "Dockerfile: FROM: tag '2.9.0-py311' does not match ray==2.60.0 in constraints.txt" in problems
    assert any("the last USER is 'root'" in problem for problem in problems)


def test_guard_dockerfile_unpinned_and_secrets():
    text = (
        "ARG BASE=rayproject/ray:2.60.0-py311\nFROM ${BASE}\nWORKDIR /app\nCOPY .env /app/.env\n"
        "ENV AWS_SECRET_ACCESS_KEY=x\nRUN pip install -e .\nUSER 1000\n"
    )
    problems = check_dockerfile(text, "2.60.0", "Dockerfile")
    assert not any("FROM" in problem for problem in problems)  # ARG defaults are resolved
    assert any("RUN: no `pip install -c constraints.txt -e .`" in problem for problem in problems)
    assert any("COPY .env: copies a credentials file" in problem for problem in problems)
    assert any("ENV AWS_SECRET_ACCESS_KEY" in problem for problem in problems)


def test_guard_dockerignore_missing_entries():
    problems = check_dockerignore(".git\nruns/\n", ".dockerignore")
    assert ".dockerignore: .venv: missing; `COPY . /app` would put it in the image" in problems
    assert not any(": runs:" in problem for problem in problems)  # a trailing slash still counts


def test_guard_quantity_parsing():
    assert parse_quantity("500m") == 0.5
    assert parse_quantity("28Gi") == 28 * 2**30
    assert parse_quantity(7) == 7
    with pytest.raises(ValueError, match="unknown suffix"):
        parse_quantity("3Gb")
