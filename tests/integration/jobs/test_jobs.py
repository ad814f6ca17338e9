"""Ray Jobs against a real cluster: `ray start --head` on loopback, dashboard and Jobs API on.

The cluster runs in its own --temp-dir and is stopped by killing exactly its processes
(found by an environment marker, its temp dir, and their children), never with `ray stop`:
that kills every Ray process of the user, including an embedded `ray.init()` that other
tests in the same session (or another checkout on this machine) may be using.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from smolvla_ray import jobs
from smolvla_ray.spec import SpecError
from tests.conftest import S3Server
from tests.processes import free_port, kill_pids, marked_pids

REPO = Path(__file__).resolve().parents[3]
TINY_DEMO = str(REPO / "configs" / "tiny-demo.yaml")
RAY = Path(sys.executable).parent / "ray"
ACCESS_KEY = "AKIAIOSFODNN7EXAMPLE"
SECRET_KEY = "s3cr3t-wJalrXUtnFEMI-K7MDENG"


@dataclass(frozen=True)
class Cluster:
    """A running single-node Ray cluster started by `ray start --head`."""

    address: str  # the dashboard / Jobs API URL
    temp_dir: Path
    marker: str  # NAME=VALUE in the environment of every process the cluster started

    def all_job_ids(self) -> set[str]:
        """Every job on the cluster, ours or not (Ray's own client, no filtering)."""
        from ray.job_submission import JobSubmissionClient

        return {d.submission_id or d.job_id for d in JobSubmissionClient(self.address).list_jobs()}


def _cluster_pids(marker: str, temp_dir: Path) -> set[int]:
    return marked_pids(marker, cmdline_fragment=str(temp_dir))


def _kill_cluster(marker: str, temp_dir: Path) -> None:
    kill_pids(_cluster_pids(marker, temp_dir))
    kill_pids(_cluster_pids(marker, temp_dir))  # anything a dying parent started meanwhile
    left = _cluster_pids(marker, temp_dir)
    if left:
        raise RuntimeError(f"Ray cluster processes {sorted(left)} survived SIGKILL")


def _wait_for_jobs_api(address: str, headers: Mapping[str, str], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        request = urllib.request.Request(f"{address}/api/jobs/", headers=dict(headers))
        with (
            contextlib.suppress(OSError, urllib.error.URLError),
            urllib.request.urlopen(request, timeout=2) as response,
        ):
            if response.status == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"the Jobs API at {address} did not answer within {timeout_s}s")


@contextlib.contextmanager
def running_cluster(env_extra: Mapping[str, str], *, token: str | None = None) -> Iterator[Cluster]:
    """Start a head node on loopback with free ports, yield it, kill exactly its processes."""
    # Short path: Ray's unix sockets live under the temp dir (108-byte limit).
    temp_dir = Path(tempfile.mkdtemp(prefix="srj-", dir="/tmp"))
    marker = f"SMOLVLA_RAY_TEST_CLUSTER={uuid.uuid4().hex}"
    dashboard_port = free_port()
    env = {
        k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
    }
    env.update(env_extra)
    env[marker.split("=")[0]] = marker.split("=")[1]
    # The job's entrypoint runs `python`: make it this venv's.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    command = [
        str(RAY), "start", "--head", "--node-ip-address", "127.0.0.1",
        "--port", str(free_port()), "--dashboard-port", str(dashboard_port),
        "--dashboard-host", "127.0.0.1", "--include-dashboard=true",
        "--ray-client-server-port", str(free_port()),
        "--dashboard-agent-listen-port", str(free_port()),
        "--num-cpus", "4", "--object-store-memory", str(300 * 1024**2),
        "--temp-dir", str(temp_dir), "--disable-usage-stats",
    ]  # fmt: skip
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        if started.returncode != 0:
            raise RuntimeError(
                f"ray start failed:\n{started.stdout[-3000:]}{started.stderr[-3000:]}"
            )
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        _wait_for_jobs_api(address, headers)
        yield Cluster(address=address, temp_dir=temp_dir, marker=marker)
    finally:
        _kill_cluster(marker, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(s3_server: S3Server) -> Iterator[Cluster]:
    """Auth off (loopback only). The S3 credentials live in the cluster's environment, the way
    docs/cluster.md says to provide them, so specs can be uploaded without secrets."""
    env = {
        "RAY_AUTH_MODE": "disabled",
        "SMOLVLA_STORAGE_OPTIONS": json.dumps(s3_server.storage_options),
    }
    with running_cluster(env) as running:
        yield running


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    from smolvla_ray.data.synthetic import write_demo_dataset

    root = tmp_path_factory.mktemp("jobs-data") / "demo"
    return write_demo_dataset(str(root), num_episodes=2, episode_length=30)


@pytest.fixture(autouse=True)
def _no_ambient_auth(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)


def demo_overrides(dataset: str, storage: str, *extra: str) -> list[str]:
    """tiny-demo.yaml made small: 1 worker, 4 steps, the test's dataset and storage, no
    held-out evaluation (2 episodes of 2 tasks: LeRobot's split would hold out both).

    Timeouts below are generous: this 2-core machine is shared with other test runs."""
    items = [
        f"data.uri={dataset}",
        "eval=null",
        "checkpoint.keep_best=0",
        "data.num_loader_workers=0",
        f"checkpoint.storage={storage}",
        "checkpoint.every_steps=null",
        "scaling.num_workers=1",
        "train.steps=4",
        "train.log_every=2",
        *extra,
    ]
    # `--set` of one field twice is refused: an extra replaces the default it overrides.
    return list({item.split("=", 1)[0]: item for item in items}.values())


@pytest.mark.slow
def test_submit_runs_to_success_and_is_listed(
    cluster: Cluster, small_dataset: str, tmp_path: Path
) -> None:
    storage = tmp_path / "runs"
    job_id = jobs.submit(
        TINY_DEMO, cluster.address, overrides=demo_overrides(small_dataset, str(storage))
    )
    assert job_id.startswith("tiny-demo-")
    assert jobs.status(job_id, cluster.address) in ("PENDING", "RUNNING", "SUCCEEDED")

    final = jobs.wait_for(job_id, cluster.address, timeout_s=300)
    output = list(jobs.logs(job_id, cluster.address))
    assert final.status == "SUCCEEDED", "\n".join(output[-40:])
    assert jobs.status(job_id, cluster.address) == "SUCCEEDED"
    assert final.name == "tiny-demo" and len(final.spec_sha256) == 64
    assert final.start_time is not None and final.end_time is not None
    assert final.start_time <= final.end_time
    assert any("[smolvla-ray] step 4/4" in line for line in output), output[-40:]
    # Following a finished job replays its output and ends.
    assert list(jobs.logs(job_id, cluster.address, follow=True)) == output
    assert (storage / "tiny-demo").is_dir()  # absolute path: the job wrote where we checked
    listed = {j.job_id: j for j in jobs.list_jobs(cluster.address)}
    assert listed[job_id].status == "SUCCEEDED" and listed[job_id].name == "tiny-demo"
    from ray.job_submission import JobSubmissionClient

    details = JobSubmissionClient(cluster.address).get_job_info(job_id)
    assert details.entrypoint == jobs.ENTRYPOINT
    assert details.metadata == {
        "submitted_by": "smolvla-ray",
        "name": "tiny-demo",
        "spec_sha256": final.spec_sha256,
    }
    assert [uri.startswith("gcs://") for uri in details.runtime_env["py_modules"]] == [True]
    # It trained on the cluster's own workers (the job's RAY_ADDRESS), not on a Ray of its own:
    # the cluster's logs hold a Ray Train worker of this job (worker-<id>-<job id>-<pid>).
    assert details.driver_info is not None
    logs = cluster.temp_dir.glob(f"session_*/logs/worker-*-{details.driver_info.id}-*")
    assert any(":actor_name:RayTrainWorker" in p.read_text(errors="replace") for p in logs)


@pytest.mark.slow
def test_stop_ends_a_running_job_as_stopped(
    cluster: Cluster, small_dataset: str, tmp_path: Path
) -> None:
    overrides = demo_overrides(small_dataset, str(tmp_path / "runs"), "train.steps=10000")
    job_id = jobs.submit(TINY_DEMO, cluster.address, overrides=overrides)
    stream = jobs.logs(job_id, cluster.address, follow=True)
    seen = []
    for line in stream:  # training really runs before we stop it
        seen.append(line)
        if "[smolvla-ray] step" in line:
            break
    stream.close()  # cancels the websocket tail
    assert any("/10000" in line for line in seen), seen[-40:]

    assert jobs.stop(job_id, cluster.address) is True
    final = jobs.wait_for(job_id, cluster.address, timeout_s=120)
    assert final.status == "STOPPED"
    assert jobs.stop(job_id, cluster.address) is False  # already ended
    assert job_id in {j.job_id for j in jobs.list_jobs(cluster.address)}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "error"),
    [
        (["train.steps=-1"], SpecError),
        (["train.stepz=4"], SpecError),
        (["scaling.num_workers=0"], SpecError),
        (["data.uri=/nonexistent/dataset"], FileNotFoundError),
    ],
)
def test_bad_input_fails_before_anything_is_submitted(
    cluster: Cluster, small_dataset: str, tmp_path: Path, case: list[str], error: type
) -> None:
    before = cluster.all_job_ids()
    overrides = demo_overrides(small_dataset, str(tmp_path / "runs"), *case)
    with pytest.raises(error):
        jobs.submit(TINY_DEMO, cluster.address, overrides=overrides)
    # Validation comes before contacting the cluster: an unreachable address changes nothing.
    with pytest.raises(error):
        jobs.submit(TINY_DEMO, f"http://127.0.0.1:{free_port()}", overrides=overrides)
    assert cluster.all_job_ids() == before


@pytest.mark.slow
def test_unreachable_address_and_unknown_job_name_the_fix(cluster: Cluster) -> None:
    address = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConnectionError, match=f"{address}.*ray start --head.*8265"):
        jobs.list_jobs(address)
    for call in (jobs.status, jobs.info, jobs.stop, jobs.logs):
        with pytest.raises(ValueError, match="no job 'no-such-job-123'.*smolvla-ray list"):
            call("no-such-job-123", cluster.address)
    with pytest.raises(ValueError, match="Ray Client address"):
        jobs.list_jobs("ray://127.0.0.1:10001")


@pytest.mark.slow
def test_secrets_reach_neither_upload_metadata_logs_nor_checkpoints(
    cluster: Cluster, s3_server: S3Server, small_dataset: str, tmp_path: Path
) -> None:
    import s3fs

    bucket = s3_server.make_bucket("jobs")
    spec = yaml.safe_load(Path(TINY_DEMO).read_text())
    spec["storage_options"] = {
        "key": ACCESS_KEY,  # moto accepts any key: local preflight writes with this one
        "secret": SECRET_KEY,
        "client_kwargs": s3_server.storage_options["client_kwargs"],
    }
    spec_path = tmp_path / "secret-spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    overrides = demo_overrides(small_dataset, s3_server.url(bucket, "runs"), "name=secret-job")
    try:
        job_id = jobs.submit(str(spec_path), cluster.address, overrides=overrides, wait=True)
    except jobs.JobFailedError as err:
        pytest.fail("\n".join([str(err), *jobs.logs(err.info.job_id, cluster.address)][-60:]))
    output = "\n".join(jobs.logs(job_id, cluster.address))

    from ray.job_submission import JobSubmissionClient

    details = JobSubmissionClient(cluster.address).get_job_info(job_id)
    uploaded = [
        d
        for d in cluster.temp_dir.glob("session_*/runtime_resources/working_dir_files/*")
        if d.is_dir()
    ]
    spec_copies = [d / "spec.yaml" for d in uploaded if (d / "spec.yaml").exists()]
    assert spec_copies, f"no unpacked working_dir under {cluster.temp_dir}"
    shipped = [yaml.safe_load(p.read_text()) for p in spec_copies]
    assert any(s["name"] == "secret-job" for s in shipped)

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_server.storage_options)
    checkpoint_files = fs.find(f"{bucket}/runs/secret-job")
    assert checkpoint_files, "the job wrote nothing to S3"
    haystacks = {
        "job details": repr(details),
        "logs": output,
        **{str(p): p.read_text() for d in uploaded for p in d.rglob("*") if p.is_file()},
        **{f: fs.cat_file(f).decode("latin-1") for f in checkpoint_files},
    }  # fmt: skip
    for where, text in haystacks.items():
        for secret in (ACCESS_KEY, SECRET_KEY):
            assert secret not in text, f"{secret[:4]}... leaked into {where}"


@pytest.mark.slow
def test_token_auth(monkeypatch: pytest.MonkeyPatch) -> None:
    token = uuid.uuid4().hex + uuid.uuid4().hex
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    with running_cluster(env, token=token) as secured:
        with pytest.raises(PermissionError, match="token auth.*RAY_AUTH_TOKEN"):
            jobs.list_jobs(secured.address)
        monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
        with pytest.raises(PermissionError, match="rejected the token"):
            jobs.list_jobs(secured.address)
        token_file = Path(tempfile.mkdtemp()) / "token"
        token_file.write_text(token + "\n")
        monkeypatch.delenv("RAY_AUTH_TOKEN")
        monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
        assert jobs.list_jobs(secured.address) == []
        monkeypatch.setenv("RAY_AUTH_TOKEN", token)
        monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
        assert jobs.list_jobs(secured.address.removeprefix("http://")) == []


def test_address_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    assert jobs.resolve_address("127.0.0.1:8265") == "http://127.0.0.1:8265"
    assert jobs.resolve_address("https://ray.example.com/") == "https://ray.example.com"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert jobs.resolve_address(None) == "http://head:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://api:8265")
    assert jobs.resolve_address(None) == "http://api:8265"
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS")
    with pytest.raises(ValueError, match="--address http://HOST:8265.*RAY_ADDRESS"):
        jobs.resolve_address(None)
    with pytest.raises(ValueError, match="finds a local Ray, not a dashboard"):
        jobs.resolve_address("auto")


def test_runtime_env_ships_the_package_and_keeps_the_working_dir(tmp_path: Path) -> None:
    package = str(Path(jobs.__file__).parent)
    shipped = jobs._runtime_env(str(tmp_path), {"env_vars": {"A": "1"}}, ship_package=True)
    assert shipped["working_dir"] == str(tmp_path) and shipped["py_modules"] == [package]
    assert shipped["env_vars"] == {"A": "1"}
    assert "py_modules" not in jobs._runtime_env(str(tmp_path), None, ship_package=False)
    with pytest.raises(ValueError, match="runtime_env.working_dir='/elsewhere'.*py_modules"):
        jobs._runtime_env(str(tmp_path), {"working_dir": "/elsewhere"}, ship_package=True)
