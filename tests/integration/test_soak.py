"""Soak: a run killed again and again at random points, by every signal a real run meets,
reaches the same weights as a run left alone, and leaves no scratch directory behind.

Kills, drawn by a seeded RNG (the seed is in the test's name, so a failure replays):
SIGINT to the driver's process group (Ctrl-C), SIGTERM to the driver, SIGKILL to the
driver's process group (its local Ray dies with it), SIGKILL or SIGTERM to one training
worker (Ray Train restarts the worker group, `failure.max_failures: -1`). After a driver
dies the same command is run again, as a user would. The test suite draws 4 kills; the
release check draws 20 (`SMOLVLA_SOAK=1`: about half an hour on two cores, so not in
every CI run). Both are `slow`: `scripts/test.sh --fast` stays a three-minute loop.
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from smolvla_ray.checkpoint.discovery import list_checkpoints
from tests.integration.conftest import tiny_spec_dict
from tests.runproc import (
    RunProcess,
    assert_no_scratch_left,
    kill_all,
    private_ray_env,
    train_worker_pids,
)

KINDS = ("driver SIGINT", "driver SIGTERM", "driver SIGKILL", "worker SIGKILL", "worker SIGTERM")
EVERY = 4


def final_weights(run_dir: Path, steps: int) -> dict[str, torch.Tensor]:
    infos = [i for i in list_checkpoints(str(run_dir)) if i.valid and i.step == steps]
    assert infos, [(i.step, i.problem) for i in list_checkpoints(str(run_dir))]
    return load_file(str(Path(infos[0].uri) / "trainable.safetensors"))


def soak(tmp_path: Path, dataset: str, *, kills: int, seed: int) -> None:
    rng = random.Random(seed)
    steps = 10 + 7 * kills
    with private_ray_env() as (env, tmpdir):

        def spec_file(name: str) -> Path:
            spec = tiny_spec_dict(
                dataset, tmp_path / "runs", name,
                train={"steps": steps, "log_every": 1},
                scaling={"num_workers": 2},
                checkpoint={"every_steps": EVERY, "keep_last": 2, "upload_mode": "async"},
                failure={"max_failures": -1},
            )  # fmt: skip
            path = tmp_path / f"{name}.yaml"
            path.write_text(yaml.safe_dump(spec))
            return path

        reference = RunProcess(spec_file("alone"), env, tmp_path / "alone.log")
        assert reference.wait(600) == 0, reference.output()[-4000:]

        spec, done, plan = spec_file("soaked"), [], [rng.choice(KINDS) for _ in range(kills)]
        run = None
        for number, kind in enumerate(plan):
            if run is None:
                run = RunProcess(spec, env, tmp_path / f"soaked-{number}.log")
            target = min(run.last_step() + rng.randint(2, 6), steps - 2)
            run.wait_for_step(target, timeout_s=300)
            if kind.startswith("worker"):
                workers = train_worker_pids(env)
                assert workers, run.output()[-3000:]
                os.kill(rng.choice(workers), getattr(signal, kind.split()[1]))
                done.append((kind, target))
                continue
            if kind == "driver SIGINT":
                os.killpg(run.proc.pid, signal.SIGINT)
                assert run.wait() == 130, run.output()[-4000:]
            elif kind == "driver SIGTERM":
                os.kill(run.proc.pid, signal.SIGTERM)
                assert run.wait() == 143, run.output()[-4000:]
            else:
                os.killpg(run.proc.pid, signal.SIGKILL)
                run.wait()
                kill_all(env)  # its workers, orphaned in process groups of their own
            done.append((kind, target))
            run = None
        if run is None:
            run = RunProcess(spec, env, tmp_path / "soaked-last.log")
        assert run.wait(600) == 0, (done, run.output()[-4000:])
        kill_all(env)
        alone, soaked = final_weights(tmp_path / "runs/alone", steps), None
        soaked = final_weights(tmp_path / "runs/soaked", steps)
        assert set(alone) == set(soaked)
        for name in alone:
            torch.testing.assert_close(soaked[name], alone[name], rtol=1e-6, atol=1e-7, msg=name)
        assert_no_scratch_left(tmpdir)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1])
def test_soak_four_kills(tmp_path: Path, demo_dataset: str, seed: int) -> None:
    soak(tmp_path, demo_dataset, kills=4, seed=seed)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SMOLVLA_SOAK") != "1", reason="release check: SMOLVLA_SOAK=1")
@pytest.mark.parametrize("seed", [1000])
def test_soak_twenty_kills(tmp_path: Path, demo_dataset: str, seed: int) -> None:
    soak(tmp_path, demo_dataset, kills=20, seed=seed)
