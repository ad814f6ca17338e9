"""`smolvla-ray run` as a real process on a private local Ray of its own, for the tests of
how runs end (tests/integration/test_endings.py) and the soak test: started in a session of
its own (a terminal's process group), with its own TMPDIR so leftovers can be seen."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from smolvla_ray.checkpoint.discovery import list_checkpoints
from tests.processes import QUICK_RAY_TRAIN, kill_pids, marked_pids, read_proc

REPO = Path(__file__).resolve().parents[1]
STEP_LINE = re.compile(r"step\s+(\d+)/")


@contextlib.contextmanager
def private_ray_env() -> Iterator[tuple[dict[str, str], Path]]:
    """(environment, its TMPDIR): a marker on every process it starts (all killed at the
    end), a TMPDIR and a Ray temp dir of its own, no RAY_* variable of the caller."""
    marker = f"SMOLVLA_RAY_RUNPROC={uuid.uuid4().hex}"
    scratch = Path(tempfile.mkdtemp(prefix="srp-", dir="/tmp"))  # short: Ray's sockets
    (scratch / "tmp").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        dict([marker.split("=")]),
        TMPDIR=str(scratch / "tmp"),
        RAY_TMPDIR=str(scratch),
        RAY_DEDUP_LOGS="0",
        PYTHONPATH=str(REPO),
        **QUICK_RAY_TRAIN,
    )
    try:
        yield env, scratch / "tmp"
    finally:
        kill_pids(marked_pids(marker))
        shutil.rmtree(scratch, ignore_errors=True)


def run_pids(env: dict[str, str]) -> set[int]:
    """Every process started under `env` (its marker) still running."""
    key = next(k for k in env if k == "SMOLVLA_RAY_RUNPROC")
    return marked_pids(f"{key}={env[key]}")


def train_worker_pids(env: dict[str, str]) -> list[int]:
    return sorted(p for p in run_pids(env) if b"RayTrainWorker" in read_proc(p, "cmdline"))


class RunProcess:
    """`smolvla-ray run SPEC` in a session of its own (a terminal's process group)."""

    def __init__(self, spec: Path, env: dict[str, str], log: Path) -> None:
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "smolvla_ray.cli", "run", str(spec), "--progress", "lines"],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True,
            )  # fmt: skip

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def last_step(self) -> int:
        """The highest step this process has shown (0 before its first)."""
        return max((int(m) for m in STEP_LINE.findall(self.output())), default=0)

    def wait_for_step(self, step: int, timeout_s: float = 240) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.last_step() >= step:
                return
            assert self.proc.poll() is None, self.output()[-4000:]
            time.sleep(0.2)
        raise AssertionError(f"no step {step} in {timeout_s}s:\n{self.output()[-4000:]}")

    def wait(self, timeout_s: float = 240) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise AssertionError(f"run did not end:\n{self.output()[-4000:]}") from None


def saved_steps(run_dir: Path) -> tuple[list[int], list[int]]:
    infos = list_checkpoints(str(run_dir), hashes=True)
    return [i.step for i in infos if i.valid], [i.step for i in infos if not i.valid]


def assert_no_scratch_left(tmpdir: Path) -> None:
    """Nothing of ours under TMPDIR but the (empty) scratch root."""
    root = tmpdir / f"smolvla-ray-{os.getuid()}"
    left = [p for p in tmpdir.iterdir() if "smolvla" in p.name and p != root]
    left += list(root.iterdir()) if root.exists() else []
    assert not left, left


def stopped_at(output: str) -> int:
    match = re.search(r"stopped at step (\d+) of", output)
    assert match, output[-4000:]
    return int(match.group(1))


def kill_all(env: dict[str, str]) -> None:
    """SIGKILL what is left of a run whose driver was killed (workers outlive it briefly)."""
    kill_pids(run_pids(env), grace_s=0.0)
