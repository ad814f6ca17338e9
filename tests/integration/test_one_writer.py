"""One writer per run, with real processes: while one `smolvla-ray run` trains, a second run
of the same job name and storage exits 2 naming the first; the first finishes and releases
the run directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from smolvla_ray import lease
from smolvla_ray.run_layout import LEASE_FILE
from tests.integration.conftest import tiny_spec_dict
from tests.processes import QUICK_RAY_TRAIN, kill_pids, marked_pids

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def test_a_second_run_of_the_same_job_exits_2_naming_the_first(
    tmp_path: Path, demo_dataset: str
) -> None:
    spec = tiny_spec_dict(
        demo_dataset, tmp_path / "runs", "one-writer", train={"steps": 40},
        scaling={"num_workers": 1},
    )  # fmt: skip
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    run = tmp_path / "runs" / "one-writer"
    ray_tmp = Path(tempfile.mkdtemp(prefix="sra-", dir="/tmp"))  # short: unix sockets
    marker = f"SMOLVLA_RAY_LEASE_TEST={uuid.uuid4().hex}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        dict([marker.split("=")]), RAY_TMPDIR=str(ray_tmp), PYTHONPATH=str(REPO), **QUICK_RAY_TRAIN
    )
    command = [sys.executable, "-m", "smolvla_ray.cli", "run", str(path), "--progress", "lines"]
    log = tmp_path / "first.log"
    try:
        with open(log, "wb") as out:
            first = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=out)
        deadline = time.monotonic() + 300
        while not (run / LEASE_FILE).exists():
            assert first.poll() is None, log.read_text()[-5000:]
            assert time.monotonic() < deadline, "the first run never took the lease"
            time.sleep(0.2)
        holder = lease.read(str(run))
        assert holder is not None and holder.pid == first.pid
        assert "smolvla_ray.cli run" in holder.command

        second = subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300
        )
        assert first.poll() is None, "the first run ended before the second was refused"
        flat = " ".join(second.stderr.split())
        assert second.returncode == 2, second.stdout[-3000:] + second.stderr[-3000:]
        assert f"is in use by pid {first.pid} on host" in flat, flat

        assert first.wait(timeout=600) == 0, log.read_text()[-5000:]
        assert not (run / LEASE_FILE).exists()
        assert "finished at step 40" in log.read_text()
    finally:
        kill_pids(marked_pids(marker))
        shutil.rmtree(ray_tmp, ignore_errors=True)
