"""A job that comes back on another number of workers (issue 18), on a real embedded Ray:
2 workers -> checkpoint -> 1 worker, and 1 -> 2, against the uninterrupted run with the same
global batch. Every step trains on the same samples (recorded per worker by
SMOLVLA_RAY_SAMPLE_LOG), none twice within an epoch, across an epoch's end; the losses and
the final weights equal the uninterrupted run's up to float summation order.

The 1-worker halves run in-process (the same trainer, without a Ray launch: each costs tens
of seconds here); the 2-worker halves through Ray Train and the driver's checks.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from smolvla_ray import driver
from smolvla_ray.checkpoint.discovery import fetch_checkpoint, list_checkpoints
from smolvla_ray.checkpoint.format import read_checkpoint
from smolvla_ray.run_layout import run_uri
from smolvla_ray.spec import JobSpec, spec_from_dict
from smolvla_ray.train.metrics import read_metrics
from smolvla_ray.train.sample_log import SAMPLE_LOG_ENV
from tests.inprocess import train_in_process
from tests.integration.conftest import tiny_spec_dict

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]

# One 40-frame episode, a global batch of 12: 3 steps an epoch (36 samples, the 4 after the
# last whole batch go to nobody), so 5 steps cross into the second epoch. A constant lr keeps
# the schedule independent of train.steps (a run of 2 steps extended to 5 is the 5-step run),
# and eps=1e-6 keeps Adam from turning summation-order noise in near-zero gradients into
# visible parameter noise (see test_train_loop.py).
GLOBAL_BATCH, STEPS, STOP = 12, 5, 2
TRAIN = {
    "log_every": 1,
    "optimizer": {"lr": 1e-3, "eps": 1e-6},
    "scheduler": {"type": "constant"},
}
# Tolerances: the same samples, noise and time; only the order in which per-sample terms
# and gradients are summed differs (one worker's batch of 12 against two all-reduced
# halves): float32 rounding, carried on by the Adam updates. Measured here: at most 1.2e-7
# relative in the losses and 8e-7 absolute in the weights. 1e-5 (relative for losses,
# relative + absolute for weights, as test_train_loop.py's two-vs-one-worker check) leaves
# about a hundred times that, and stays far below what one other sample in a step of 12
# would change (its per-sample loss, a twelfth of the mean, differs from another's by tens
# of percent); the sample log checks the samples themselves.
LOSS_RTOL = WEIGHT_TOL = 1e-5


def spec(dataset: str, storage: Path, name: str, *, workers: int, batch: int, steps: int):
    return spec_from_dict(
        tiny_spec_dict(
            dataset, storage, name,
            data={"episodes": [0]},
            train={**TRAIN, "steps": steps, "batch_size": batch},
            scaling={"num_workers": workers},
            checkpoint={"storage": str(storage), "every_steps": None, "keep_last": 2},
        )
    )  # fmt: skip


def samples(log: Path) -> dict[int, list[int]]:
    """Step -> the sample indices of all workers (sorted: the set of the global batch)."""
    steps: dict[int, list[int]] = {}
    for line in log.read_text().splitlines():
        record = json.loads(line)
        steps.setdefault(record["step"], []).extend(record["index"])
    return {step: sorted(index) for step, index in sorted(steps.items())}


def losses(storage: Path, name: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_uri(str(storage), name))}


def final(storage: Path, name: str) -> tuple[JobSpec, dict[str, torch.Tensor]]:
    """The spec recorded in the run's last checkpoint and its trainable tensors."""
    info = list_checkpoints(run_uri(str(storage), name))[-1]
    assert info.step == STEPS
    with tempfile.TemporaryDirectory() as tmp:
        local = fetch_checkpoint(info.uri, Path(tmp))
        recorded = spec_from_dict(read_checkpoint(local).state.spec)
        return recorded, load_file(str(local / "trainable.safetensors"))


def test_a_run_resumes_on_another_number_of_workers_with_the_same_samples_and_losses(
    tmp_path: Path, demo_dataset: str, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    def log(name: str) -> Path:
        path = tmp_path / f"{name}.samples.jsonl"
        monkeypatch.setenv(SAMPLE_LOG_ENV, str(path))  # read by train_in_process / driver.run
        return path

    # The uninterrupted run: one worker with the whole global batch.
    whole_log = log("whole")
    train_in_process(spec(demo_dataset, tmp_path, "whole", workers=1, batch=12, steps=STEPS))
    reference = samples(whole_log)
    assert list(reference) == list(range(1, STEPS + 1))
    assert all(len(rows) == GLOBAL_BATCH for rows in reference.values())
    first_epoch = [i for step in (1, 2, 3) for i in reference[step]]
    second_epoch = [i for step in (4, 5) for i in reference[step]]
    assert len(set(first_epoch)) == 36 and len(set(second_epoch)) == 24  # none twice

    # 2 workers x 6 -> checkpoint at step 2 -> 1 worker (batch_size left at 6: derived 12).
    two_log = log("two-to-one")
    driver.run(spec(demo_dataset, tmp_path, "two-to-one", workers=2, batch=6, steps=STOP))
    one = spec(demo_dataset, tmp_path, "two-to-one", workers=1, batch=6, steps=STEPS)
    driver.preflight(one)  # the driver's check before Ray: not refused
    capsys.readouterr()
    state, _ = train_in_process(one)
    assert state is not None and state.resumed_from_step == STOP
    out = capsys.readouterr().out
    assert (
        "resume: train.batch_size: 6 -> 12 (derived: the global batch of 12 samples "
        "(train.batch_size 6 x grad_accum_steps 1 x 2 worker(s)) is kept on 1 worker(s))"
    ) in out
    assert "resume: scaling.num_workers: 2 -> 1 (the global batch is kept" in out

    # 1 worker x 12 -> checkpoint at step 2 -> 2 workers (batch_size left at 12: derived 6).
    one_log = log("one-to-two")
    train_in_process(spec(demo_dataset, tmp_path, "one-to-two", workers=1, batch=12, steps=STOP))
    driver.run(spec(demo_dataset, tmp_path, "one-to-two", workers=2, batch=12, steps=STEPS))

    _, expected = final(tmp_path, "whole")
    for name, log_file, workers, batch in [
        ("two-to-one", two_log, 1, 12),
        ("one-to-two", one_log, 2, 6),
    ]:
        assert samples(log_file) == reference, name  # each step's global batch, no repeats
        records = [json.loads(line) for line in log_file.read_text().splitlines()]
        assert {(r["step"] > STOP, r["world_size"]) for r in records} == {
            (False, 3 - workers),
            (True, workers),
        }
        got, want = losses(tmp_path, name), losses(tmp_path, "whole")
        assert list(got) == list(range(1, STEPS + 1)), name
        for step in want:
            assert got[step] == pytest.approx(want[step], rel=LOSS_RTOL), (name, step)
        recorded, weights = final(tmp_path, name)  # the spec as it ran after the resume
        assert (recorded.scaling.num_workers, recorded.train.batch_size) == (workers, batch)
        assert recorded.global_batch_size == GLOBAL_BATCH
        assert set(weights) == set(expected)
        for key in weights:
            torch.testing.assert_close(
                weights[key], expected[key], rtol=WEIGHT_TOL, atol=WEIGHT_TOL, msg=key
            )
