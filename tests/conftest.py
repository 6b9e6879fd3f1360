"""Shared pytest fixtures."""

import os
from pathlib import Path

import pytest

# The data folder sits next to the repository: <repository>/../shared/data.
DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


@pytest.fixture(scope="session")
def data_root() -> Path:
    """Return the folder of real test data: $CERVI_RAY_DATA, else ../shared/data."""
    root = Path(os.environ.get("CERVI_RAY_DATA", DEFAULT_DATA_ROOT)).resolve()
    if not root.is_dir():
        pytest.fail(
            f"Test data folder {root} not found. Set CERVI_RAY_DATA to the folder that contains "
            f"isbi2015/ and isbi2014/."
        )
    return root


# Fake credentials for the loopback S3 server; never real ones. Setting them before Ray starts
# means every Ray worker inherits them. The metadata service is switched off so no SDK looks
# for credentials or a region on the network.
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(scope="session")
def fake_aws_env():
    saved = {key: os.environ.get(key) for key in FAKE_AWS_ENV}
    os.environ.update(FAKE_AWS_ENV)
    yield FAKE_AWS_ENV
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def ray_cluster(fake_aws_env):
    """A local Ray on 127.0.0.1 with 4 logical CPUs: room for 2 training workers and tasks."""
    import ray

    ray.init(
        num_cpus=4,
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": dict(fake_aws_env)},
    )
    yield ray
    ray.shutdown()


@pytest.fixture
def baby_config(data_root, tmp_path):
    """The baby profile with outputs in tmp_path and the real data root."""
    from cervi_ray.config import load_config

    config_path = Path(__file__).resolve().parents[1] / "configs" / "baby.yaml"
    return load_config(
        config_path,
        [f"data.root={data_root}", f"run.output_dir={tmp_path / 'runs'}"],
    )


def run_moto_server():
    """Start moto's S3 server on a free loopback port; yield its endpoint URL, then stop it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_server(fake_aws_env):
    """moto's S3 server on a free loopback port; yields its endpoint URL."""
    yield from run_moto_server()


@pytest.fixture(scope="module")
def module_s3_server(fake_aws_env):
    """One moto S3 server for all tests of a module, e.g. for jobs that outlive a test."""
    yield from run_moto_server()
