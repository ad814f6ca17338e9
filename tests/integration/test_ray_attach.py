"""Which Ray `run` trains on. With a stranger's `ray start --head` cluster running on this
machine, where a plain `ray.init()` would find and join it: `run` without an address and
without RAY_ADDRESS trains on a private local Ray; with RAY_ADDRESS pointing at the cluster
(as inside a submitted Ray Job or a KubeRay RayJob) it joins that cluster.

The stranger is found the way Ray finds one, through `<ray temp dir>/ray_current_cluster`;
RAY_TMPDIR points it and the drivers at a directory of this test's own, so no other Ray on
the machine sees it (and the drivers see no other)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import tiny_spec_dict
from tests.processes import QUICK_RAY_TRAIN, free_port, kill_pids, marked_pids

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).parent / "ray"

DRIVER = """
import json, os, sys
import ray
from smolvla_ray import driver
from smolvla_ray.spec import spec_from_dict

result = driver.run(spec_from_dict(json.loads(sys.argv[1])))
gcs = ray.get_runtime_context().gcs_address
print("RESULT " + json.dumps({"gcs": gcs, "pid": os.getpid(), "step": result.metrics["step"]}))
"""

JOBS = """
import json, sys
import ray
from ray._private.state import jobs

ray.init(address=sys.argv[1], log_to_driver=False)
me = ray.get_runtime_context().get_job_id()
print("JOBS " + json.dumps({"pids": [j["DriverPid"] for j in jobs() if j["JobID"] != me]}))
"""


def python(code: str, *args: str, env: dict[str, str], tag: str) -> Any:
    """Run `code` in a subprocess; the line of its output starting with `tag`, parsed, with
    the whole output under "output"."""
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    lines = [x for x in done.stdout.splitlines() if x.startswith(f"{tag} ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-5000:]
    return {**json.loads(lines[0].removeprefix(f"{tag} ")), "output": done.stdout + done.stderr}


def test_run_trains_on_a_private_ray_unless_ray_address_names_a_cluster(
    tmp_path: Path, demo_dataset: str
) -> None:
    ray_tmp = Path(tempfile.mkdtemp(prefix="sra-", dir="/tmp"))  # short: unix sockets
    marker = f"SMOLVLA_RAY_ATTACH_TEST={uuid.uuid4().hex}"
    port = free_port()
    stranger = f"127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        dict([marker.split("=")]),
        RAY_TMPDIR=str(ray_tmp),
        RAY_AUTH_MODE="disabled",
        PYTHONPATH=str(REPO),
        **QUICK_RAY_TRAIN,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    try:
        started = subprocess.run(
            [
                str(RAY), "start", "--head", "--port", str(port), "--num-cpus", "2",
                "--node-ip-address", "127.0.0.1", "--include-dashboard=false",
                "--ray-client-server-port", str(free_port()),
                "--node-manager-port", str(free_port()),
                "--object-manager-port", str(free_port()),
                "--object-store-memory", str(200 * 1024**2), "--disable-usage-stats",
            ],
            env=env, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        # What makes it a trap: a plain `ray.init()` here would join it (Ray records the
        # node's own IP there, not the loopback address it was started on).
        found = (ray_tmp / "ray" / "ray_current_cluster").read_text().strip()
        assert found.rsplit(":", 1)[1] == str(port), found

        spec = tiny_spec_dict(
            demo_dataset, tmp_path / "runs", "attach", train={"steps": 2, "log_every": 1},
            scaling={"num_workers": 1},
        )  # fmt: skip
        spec["train"]["steps"] = 12  # long enough for Ray Train's placement-group cleaner to look
        private = python(DRIVER, json.dumps(spec), env=env, tag="RESULT")
        assert private["step"] == 12 and not private["gcs"].endswith(f":{port}"), private
        # The cleaner asked its own Ray, not the stranger (which would have it remove the
        # run's placement group): nothing in the driver's output about other instances.
        assert "multiple active Ray instances" not in private["output"], private["output"]
        assert "Cleaning up placement group" not in private["output"], private["output"]

        spec["name"], spec["train"]["steps"] = "joined", 2
        joined = python(
            DRIVER, json.dumps(spec), env={**env, "RAY_ADDRESS": stranger}, tag="RESULT"
        )
        assert joined["step"] == 2 and joined["gcs"].endswith(f":{port}"), joined

        # The stranger saw exactly one driver: the one told to join it.
        assert python(JOBS, stranger, env=env, tag="JOBS")["pids"] == [joined["pid"]]
    finally:
        kill_pids(marked_pids(marker))
        shutil.rmtree(ray_tmp, ignore_errors=True)
