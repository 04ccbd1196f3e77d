"""Shared fixtures: a real S3 endpoint (moto server on loopback), one local Ray instance per
test session, the published reference tables and tiny image trees.

Tests that use the session's Ray instance (its fixture, directly or through another) are
marked `ray` here; tests marked `subprocess` start their own Ray cluster or job processes.
`scripts/test.sh` runs the tests without Ray beside the `ray` ones, and the `subprocess` ones
after this phase's Ray instance has shut down. A test outside the `ray` marker that starts
Ray fails: beside the session's instance it would be a second one on the machine.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from jobs.runtime import set_local_ray_env
from tests.support import free_ports, reference_path, write_image_tree

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
set_local_ray_env()  # as a job's own local instance has it
# Storage faults planted by tests fail after 3 tries, not 7 (16 s of back-off), in this
# process and the Ray workers, which inherit its environment
os.environ.setdefault("COLORCORE_STORAGE_ATTEMPTS", "3")

TEST_BUCKET = "colorcore-test"


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by the markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(autouse=True)
def _ray_only_through_its_fixture(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ray.init` refused to a test that is neither `ray` nor `subprocess`: one that started
    Ray of its own would run a second instance beside the session's."""
    if request.node.get_closest_marker("ray") or request.node.get_closest_marker("subprocess"):
        return
    import ray

    def refuse(*args, **kwargs):
        raise RuntimeError(
            "this test starts Ray: ask for the ray_session fixture (or mark it subprocess)"
        )

    monkeypatch.setattr(ray, "init", refuse)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return reference_path("")


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    bucket: str

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A moto S3 server on 127.0.0.1 with one bucket; its endpoint and test credentials are
    exported through the standard AWS variables, so the code under test (and Ray workers
    started after this fixture) reach it without any test-only switch."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    [port] = free_ports()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": endpoint,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
        Bucket=TEST_BUCKET
    )
    try:
        yield S3Server(endpoint, TEST_BUCKET)
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def ray_session(s3_server: S3Server) -> Iterator[None]:
    """One local Ray instance for the whole session (started after the S3 fixture so that
    workers inherit its environment); shut down at the end."""
    import ray
    import ray.cloudpickle

    from jobs.tune import DRIVER_RESOURCE
    from tests import crashing_format

    # the dashboard: Ray Train's placement-group cleaner needs its state API (jobs.runtime);
    # the resource of the cluster definitions' head, on which Tune trials' functions run;
    # in every worker, a picture format whose decoding kills the process (a worker imports
    # the hook before it can import from this checkout: the module goes by value)
    ray.cloudpickle.register_pickle_by_value(crashing_format)
    ray.init(
        address="local",
        num_cpus=2,
        resources={DRIVER_RESOURCE: 100},
        include_dashboard=True,
        log_to_driver=False,
        runtime_env={"worker_process_setup_hook": crashing_format.register},
    )
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    write_image_tree(tmp_path / "images")
    return tmp_path / "images"


@pytest.fixture(scope="session")
def ci_config(s3_server: S3Server, ray_session: None):
    """The `ci` training preset pointed at the synthetic sample data in the S3 bucket
    (created once per session)."""
    import dataclasses

    from jobs import train

    cfg = dataclasses.replace(
        train.ci(),
        data=s3_server.url("sample-data", "train"),
        val_data=s3_server.url("sample-data", "val"),
        storage=s3_server.url("runs"),
    )
    train.ensure_sample_data(cfg)
    return dataclasses.replace(cfg, make_sample_data=False)


@pytest.fixture(scope="session")
def ci_run(ci_config):
    """One `ci` training run per session, shared by every test that needs a trained model:
    (config, final metrics)."""
    from jobs import train

    return ci_config, train.main(ci_config)
