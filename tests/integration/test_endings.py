"""How `smolvla-ray run` ends when the user stops it: a real `run` process on its own
private local Ray, signalled the way a terminal and a process manager do.

- Ctrl-C (SIGINT to the whole process group): the step in progress finishes, its checkpoint
  is uploaded, every earlier checkpoint is kept, the run says where it stands, exit 130.
- SIGTERM to the `run` process: the same, exit 143 (with the resume that follows, in the
  soak test, tests/integration/test_soak.py).
- A second Ctrl-C aborts at once, naming the last complete checkpoint, exit 130.

No ending leaves a scratch directory behind: the processes get a TMPDIR of their own, which
must hold nothing of ours afterwards.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import tiny_spec_dict
from tests.runproc import (
    RunProcess,
    assert_no_scratch_left,
    private_ray_env,
    saved_steps,
    stopped_at,
)

pytestmark = pytest.mark.slow
STEPS, EVERY = 400, 5


@pytest.fixture
def setting(tmp_path: Path, demo_dataset: str):
    """A spec, an environment with its own TMPDIR and Ray temp dir, and cleanup of every
    process the test started."""
    with private_ray_env() as (env, tmpdir):
        spec = tiny_spec_dict(
            demo_dataset, tmp_path / "runs", "endings",
            train={"steps": STEPS, "log_every": 1},
            scaling={"num_workers": 2},
            checkpoint={"every_steps": EVERY, "keep_last": 1000, "upload_mode": "async"},
        )  # fmt: skip
        path = tmp_path / "spec.yaml"
        path.write_text(yaml.safe_dump(spec))
        yield path, env, tmp_path / "runs" / "endings", tmpdir, tmp_path


def test_ctrl_c_keeps_every_checkpoint_and_says_where_the_run_stands(setting) -> None:
    spec, env, run_dir, tmpdir, tmp_path = setting
    # Ctrl-C in a terminal: SIGINT to the whole process group.
    first = RunProcess(spec, env, tmp_path / "first.log")
    first.wait_for_step(3 * EVERY + 2)
    os.killpg(first.proc.pid, signal.SIGINT)
    assert first.wait() == 130, first.output()[-4000:]
    out = first.output()
    at = stopped_at(out)
    assert "SIGINT: stopping after the current step" in out
    valid, invalid = saved_steps(run_dir)
    expected = [s for s in range(EVERY, at + 1, EVERY)]
    assert valid == sorted(set(expected) | {at}) and not invalid, (valid, invalid, at)
    assert f"checkpoint_{at:09d}" in out
    assert_no_scratch_left(tmpdir)


def test_a_second_ctrl_c_aborts_naming_the_last_checkpoint(setting) -> None:
    spec, env, run_dir, tmpdir, tmp_path = setting
    run = RunProcess(spec, env, tmp_path / "abort.log")
    run.wait_for_step(2 * EVERY + 1)
    os.killpg(run.proc.pid, signal.SIGINT)
    time.sleep(1)  # two signals at once are one to Python
    os.killpg(run.proc.pid, signal.SIGINT)
    assert run.wait() == 130, run.output()[-4000:]
    out = " ".join(run.output().split())
    assert "aborting now" in out and "last complete checkpoint:" in out, out[-3000:]
    named = re.search(r"last complete checkpoint: (\S+)", out).group(1)
    valid, _ = saved_steps(run_dir)
    assert valid and named.endswith(f"checkpoint_{valid[-1]:09d}"), (named, valid)
    assert_no_scratch_left(tmpdir)
