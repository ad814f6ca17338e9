"""Fixtures for the fault tests: a real two-node Ray cluster on this machine, a TCP gate in
front of the loopback S3 server that can make storage vanish, and a subprocess driver.

The cluster is `ray start --head` (resource `node_a`) plus `ray start --address` (resource
`node_b`) in their own --temp-dir; every process it started carries an environment marker,
and the fixture stops exactly those processes (never `ray stop`, which would kill every Ray
on the machine, including the embedded `ray.init()` other tests in this session use). The
driver runs in a subprocess (`smolvla-ray run --address`), so this pytest process's own Ray
is never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.processes import QUICK_RAY_TRAIN, free_port, kill_pids, marked_pids, read_proc

REPO = Path(__file__).resolve().parents[3]
RAY = Path(sys.executable).parent / "ray"


@dataclass
class Node:
    """One `ray start` node: its marker (environment of all its processes) and resource."""

    resource: str
    marker: str

    def pids(self) -> set[int]:
        return marked_pids(self.marker)

    def raylet_pid(self) -> int | None:
        for pid in self.pids():
            if b"raylet" in read_proc(pid, "cmdline").split(b"\0")[0]:
                return pid
        return None

    def node_id(self) -> str:
        """The node's Ray id, from its raylet's command line."""
        raylet = self.raylet_pid()
        for arg in read_proc(raylet, "cmdline").split(b"\0") if raylet else []:
            if arg.startswith(b"--node_id="):
                return arg.split(b"=", 1)[1].decode()
        raise RuntimeError(f"no raylet found for node {self.resource}")

    def train_worker_pids(self) -> set[int]:
        """Ray Train worker processes on this node (`ray::RayTrainWorker...`)."""
        return {p for p in self.pids() if b"RayTrainWorker" in read_proc(p, "cmdline")}

    def stop(self) -> None:
        kill_pids(self.pids())


@dataclass
class TwoNodeCluster:
    """A head node (resource node_a) and a worker node (resource node_b) on loopback."""

    address: str  # GCS address, for `ray.init(address=...)` / `--address`
    temp_dir: Path
    head: Node
    second: Node
    env: dict[str, str] = field(default_factory=dict)
    # Set by a test that kills or drains the second node: the next test gets a fresh one.
    second_spent: bool = False

    def train_worker_pids(self) -> dict[str, set[int]]:
        return {n.resource: n.train_worker_pids() for n in (self.head, self.second)}

    def replace_second(self, env_extra: dict[str, str] | None = None) -> None:
        """Stop the second node's processes (whatever a test left of it) and start a new
        node_b in the same cluster, with `env_extra` in its processes' environment."""
        self.second.stop()
        self.second = _start_second(self.address, {**self.env, **(env_extra or {})})
        self.second_spent = False


def _start(command: list[str], env: dict[str, str]) -> None:
    started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    if started.returncode != 0:
        raise RuntimeError(f"ray start failed:\n{started.stdout[-3000:]}{started.stderr[-3000:]}")


COMMON = [
    "--num-cpus", "2", "--object-store-memory", str(200 * 1024**2),
    "--disable-usage-stats", "--node-ip-address", "127.0.0.1",
]  # fmt: skip


def _start_second(address: str, base: dict[str, str]) -> Node:
    """`ray start --address` a node with resource node_b; its processes carry a new marker."""
    second = Node("node_b", f"SMOLVLA_RAY_FAULTS_NODE={uuid.uuid4().hex}")
    try:
        _start(
            [
                str(RAY), "start", "--address", address,
                "--resources", json.dumps({"node_b": 1}),
                "--node-manager-port", str(free_port()),
                "--object-manager-port", str(free_port()),
                *COMMON,
            ],
            {**base, **dict([second.marker.split("=")])},
        )  # fmt: skip
    except BaseException:
        second.stop()
        raise
    return second


@contextlib.contextmanager
def two_node_cluster(env_extra: dict[str, str] | None = None) -> Iterator[TwoNodeCluster]:
    """Start head + second node with free ports, yield, stop exactly their processes."""
    temp_dir = Path(tempfile.mkdtemp(prefix="srf-", dir="/tmp"))  # short: unix sockets
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base.update(
        RAY_AUTH_MODE="disabled",
        PYTHONPATH=str(REPO),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S="1",
        **QUICK_RAY_TRAIN,
        **(env_extra or {}),
    )
    head = Node("node_a", f"SMOLVLA_RAY_FAULTS_NODE={uuid.uuid4().hex}")
    cluster: TwoNodeCluster | None = None
    try:
        env = {**base, **dict([head.marker.split("=")])}
        _start(
            [
                str(RAY), "start", "--head", "--port", str(port), "--temp-dir", str(temp_dir),
                "--include-dashboard=false", "--resources", json.dumps({"node_a": 1}),
                "--ray-client-server-port", str(free_port()),
                "--node-manager-port", str(free_port()),
                "--object-manager-port", str(free_port()),
                *COMMON,
            ],
            env,
        )  # fmt: skip
        address = f"127.0.0.1:{port}"
        cluster = TwoNodeCluster(address, temp_dir, head, _start_second(address, base), env=base)
        yield cluster
    finally:
        pids = head.pids() | (cluster.second.pids() if cluster else set())
        kill_pids(pids)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def module_cluster() -> Iterator[TwoNodeCluster]:
    """One two-node cluster for a test module. Storage retries are bounded to 8 s (the
    storage-outage tests need a run to give up; the others never lose storage)."""
    with two_node_cluster({"SMOLVLA_RAY_STORAGE_RETRY_S": "8"}) as running:
        yield running


@pytest.fixture
def cluster(module_cluster: TwoNodeCluster) -> TwoNodeCluster:
    """The module's cluster, with a fresh second node if an earlier test killed or drained
    it (a test that does sets `second_spent`; killed workers leave the cluster healthy)."""
    if module_cluster.second_spent:
        module_cluster.replace_second()
    return module_cluster


class StorageGate:
    """A TCP proxy in front of the S3 server that can take the endpoint down and up.

    Down means what a crashed or restarting server looks like to clients: existing
    connections are reset and new ones refused (the listening socket is closed); the S3
    server behind it keeps its data. `trigger` takes it down when a request line matching
    a regex passes through, so an outage can be made to start in the middle of an upload.
    """

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._trigger: tuple[re.Pattern[bytes], float | None] | None = None
        self.triggered = threading.Event()
        self.up()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        with self._lock:
            if self._listener is not None:
                return
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(64)
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                conn.close()

    def trigger(self, pattern: str, *, outage_s: float | None) -> None:
        """Go down when a request matching `pattern` passes; up again after `outage_s`
        seconds (None: stay down)."""
        self.triggered.clear()
        self._trigger = (re.compile(pattern.encode()), outage_s)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns |= {client, server}
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, upstream: bool) -> None:
        try:
            while data := source.recv(65536):
                trigger = self._trigger
                if upstream and trigger is not None and trigger[0].search(data):
                    self._trigger = None
                    self.triggered.set()
                    self.down()
                    if trigger[1] is not None:
                        threading.Timer(trigger[1], self.up).start()
                    return
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.close()


@pytest.fixture
def storage_gate(s3_server) -> Iterator[StorageGate]:
    gate = StorageGate(int(s3_server.endpoint_url.rsplit(":", 1)[1]))
    yield gate
    gate.down()


def storage_options(endpoint: str) -> dict[str, Any]:
    """s3fs options for the loopback server at `endpoint` (moto accepts any credentials)."""
    return {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }


@dataclass
class DriverRun:
    """A `smolvla-ray run --address` subprocess and its output."""

    proc: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            tail = self.output()[-4000:]
            raise AssertionError(f"driver did not finish in {timeout_s}s:\n{tail}") from None


def start_driver(
    cluster: TwoNodeCluster, spec: dict[str, Any], workdir: Path, *, name: str = "driver"
) -> DriverRun:
    """Run `spec` on `cluster` through the CLI in a subprocess; its output goes to a file."""
    spec_path = workdir / f"{name}.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    log = workdir / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "smolvla_ray.cli", "run", str(spec_path),
                "--address", cluster.address, "--progress", "lines",
            ],
            stdout=out, stderr=subprocess.STDOUT, env=cluster.env, cwd=str(workdir),
        )  # fmt: skip
    return DriverRun(proc, log)


def wait_for(condition, *, timeout_s: float, what: str, run: DriverRun | None = None):
    """Poll `condition()` until truthy; fail naming `what` (and the driver's output)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if run is not None and run.proc.poll() is not None:
            raise AssertionError(f"driver ended before {what}:\n{run.output()[-4000:]}")
        time.sleep(0.25)
    tail = run.output()[-4000:] if run is not None else ""
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}\n{tail}")
