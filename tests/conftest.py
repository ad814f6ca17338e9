"""Shared fixtures: the demo dataset, and a real S3-compatible server (moto in server mode)
on loopback.

The server is a separate process speaking HTTP, exactly what s3fs talks to in production;
nothing in the client is mocked. One server per test session; each test that needs a clean
slate asks it for a fresh bucket.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.processes import QUICK_RAY_TRAIN, free_port

# The longest test files (measured), started first so that the two parallel test processes
# (see scripts/test.sh) do not end with one of them alone on a long file. xdist would sort
# files by their number of tests instead; scripts/test.sh turns that off
# (--no-loadscope-reorder).
LONGEST_FIRST = (
    "tests/integration/test_soak.py",
    "tests/integration/faults/",
    "tests/integration/jobs/",
    "tests/integration/checkpoint/",
    "tests/integration/test_ray_attach.py",
    "tests/integration/test_endings.py",
    "tests/integration/train/",
    "tests/integration/test_one_writer.py",
    "tests/integration/cache/",
    "tests/train/",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        found = (i for i, p in enumerate(LONGEST_FIRST) if item.nodeid.startswith(p))
        return next(found, len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: the order within each file is kept


@dataclass(frozen=True)
class S3Server:
    """A running S3-compatible server: where it is and how fsspec/s3fs reaches it."""

    endpoint_url: str
    storage_options: dict[str, Any] = field(default_factory=dict)

    def make_bucket(self, prefix: str = "test") -> str:
        """Create a new, empty bucket with a unique name and return the name."""
        import s3fs

        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)
        # A plain CreateBucket: s3fs's mkdir adds a LocationConstraint that us-east-1 rejects.
        fs.call_s3("create_bucket", Bucket=name)
        fs.invalidate_cache()
        return name

    def url(self, bucket: str, *parts: str) -> str:
        """An `s3://bucket/part/...` URL."""
        return "/".join([f"s3://{bucket}", *parts])


def _wait_until_up(endpoint: str, proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited early with code {proc.returncode}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1),
        ):
            return
        time.sleep(0.1)
    raise RuntimeError(f"moto server at {endpoint} did not come up within {timeout_s}s")


@pytest.fixture(scope="session", autouse=True)
def _no_ambient_ray_address() -> Iterator[None]:
    """No test joins a Ray cluster it did not start: a RAY_ADDRESS (or
    RAY_API_SERVER_ADDRESS) of the shell running the tests is hidden for the session. Ray
    Train polls its workers more often (`QUICK_RAY_TRAIN`), here and in every process
    started from here."""
    with pytest.MonkeyPatch.context() as patch:
        for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
            patch.delenv(name, raising=False)
        for name, value in QUICK_RAY_TRAIN.items():
            patch.setenv(name, value)
        yield


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A moto S3 server process on a free loopback port, stopped at the end of the session."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "server.log"
    env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        _wait_until_up(endpoint, proc)
        yield S3Server(
            endpoint_url=endpoint,
            storage_options={
                "key": "testing",
                "secret": "testing",
                "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
            },
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh, empty bucket on the session's S3 server."""
    return s3_server.make_bucket()


@pytest.fixture
def lerobot_dataset(tmp_path: Path) -> str:
    """A copy of a dataset LeRobot 0.6.1 wrote itself (tests/lerobot/make_dataset.py): one
    camera `front` 48x64, 5-D state, 4-D action, 3 episodes."""
    copy = tmp_path / "lerobot_written"
    shutil.copytree(Path(__file__).parent / "fixtures/datasets/lerobot_written", copy)
    return str(copy)


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small v3.0 dataset with two cameras (AV1 mp4), written by the project's writer."""
    from smolvla_ray.data.synthetic import write_demo_dataset

    root = tmp_path_factory.mktemp("datasets") / "demo"
    return write_demo_dataset(str(root), num_episodes=4, episode_length=40)
