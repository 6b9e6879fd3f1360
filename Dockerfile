# cervi_ray image for Ray clusters: the KubeRay manifests in cluster/kuberay/ and the AWS cluster
# launcher config in cluster/aws/ run every Ray node (head, CPU and GPU workers) from it.
#
#   docker build -t <your-registry>/cervi-ray:<tag> .
#   docker push <your-registry>/cervi-ray:<tag>
#
# The base image carries the Ray release pinned in constraints.txt (tests/test_cluster_files.py
# checks that the tag and the pin agree) and Python 3.11, the interpreter constraints.txt was
# frozen with. It is the CPU image: torch and its CUDA libraries come from constraints.txt
# (torch 2.14.1 with the nvidia-* CUDA 13 wheels), so the same image runs on the GPU workers.
# NOTE: those CUDA 13 wheels need a host NVIDIA driver that supports CUDA 13; check the node's
# driver (nvidia-smi) before scheduling GPU workers on it.
FROM rayproject/ray:2.60.0-py311

# The base image's user `ray` has uid 1000 and primary group `users` (gid 100). A numeric USER
# lets Kubernetes verify runAsNonRoot without looking up names.
USER root
RUN mkdir /app && chown 1000:100 /app
USER 1000:100
WORKDIR /app

ENV PYTHONUNBUFFERED=1

# Install the dependencies in their own layer so that code changes do not reinstall torch:
# the package metadata and an empty cervi_ray package are enough for pip to resolve them, and
# the editable install then points at /app/cervi_ray, which the full COPY below fills in.
# boto3 is installed (at the version constraints.txt pins) because the base image ships an
# older boto3 for the cluster launcher's AWS autoscaler, which would break once pip installs
# the botocore release that constraints.txt pins.
COPY --chown=1000:100 pyproject.toml constraints.txt README.md /app/
RUN mkdir -p /app/cervi_ray \
    && touch /app/cervi_ray/__init__.py \
    && pip install --no-cache-dir -c constraints.txt -e . boto3

# The repository without what .dockerignore leaves out (.git, .venv, runs, local credentials).
# No credentials are baked in: pods get object-storage credentials from a Kubernetes Secret or
# a service-account role, and launcher nodes from their IAM instance profile.
COPY --chown=1000:100 . /app
