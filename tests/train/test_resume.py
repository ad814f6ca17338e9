"""Spec changes on resume, in-process: a changed learning rate (and betas) is applied to the
restored optimizer and announced; a changed batch size is refused, by the driver's check
before Ray and by the trainer, naming the field."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from smolvla_ray import driver
from smolvla_ray.checkpoint.discovery import fetch_checkpoint, list_checkpoints
from smolvla_ray.checkpoint.format import read_checkpoint
from smolvla_ray.checkpoint.resume import ResumeRefused
from smolvla_ray.run_layout import run_uri
from smolvla_ray.train.optim import cosine_with_warmup, resolve_schedule
from tests.inprocess import train_in_process
from tests.train.test_trainer import spec_for

SCHEDULE = {"warmup_steps": 2, "decay_steps": 100, "decay_lr": 1e-5}


def train_spec(dataset: str, storage: Path, **train):
    train = {"steps": 8, "log_every": 2, "scheduler": SCHEDULE, **train}
    return spec_for(
        dataset, storage, "changes", train=train,
        checkpoint={"storage": str(storage), "every_steps": 2},
    )  # fmt: skip


def test_a_changed_lr_is_applied_and_announced_a_changed_batch_size_refused(
    tmp_path: Path, demo_dataset: str, capsys: pytest.CaptureFixture[str]
) -> None:
    first = train_spec(demo_dataset, tmp_path, optimizer={"lr": 1e-3})
    state, _ = train_in_process(first, stop_after=4)  # killed after its step-4 checkpoint
    assert state is None

    # A batch size change is refused before Ray would start, and by the trainer itself.
    bigger = train_spec(demo_dataset, tmp_path, optimizer={"lr": 1e-3}, batch_size=2)
    with pytest.raises(ResumeRefused, match=r"train\.batch_size: 4 -> 2 \(the data cursor"):
        driver.preflight(bigger)
    with pytest.raises(ResumeRefused, match=r"train\.batch_size: 4 -> 2"):
        train_in_process(bigger)

    capsys.readouterr()
    new = {"lr": 5e-4, "betas": [0.8, 0.9]}
    state, reporter = train_in_process(train_spec(demo_dataset, tmp_path, optimizer=new))
    assert state is not None and state.resumed_from_step == 4
    out = capsys.readouterr().out
    assert "resume: train.optimizer.lr: 0.001 -> 0.0005 (set on the restored optimizer" in out
    assert "resume: train.optimizer.betas: [0.9, 0.95] -> [0.8, 0.9]" in out
    # The report of step 6 carries the lr of step index 5: the schedule at the new peak.
    warmup, decay = resolve_schedule(2, 100, 8)
    expected = 5e-4 * cosine_with_warmup(
        5, warmup_steps=warmup, decay_steps=decay, peak_lr=5e-4, decay_lr=1e-5
    )
    (report,) = [r for r in reporter.reports if r["step"] == 6]
    assert report["lr"] == pytest.approx(expected, rel=1e-12)
    # The final checkpoint records the optimizer as it ran.
    with tempfile.TemporaryDirectory() as tmp:
        info = list_checkpoints(run_uri(str(tmp_path), "changes"))[-1]
        recorded = read_checkpoint(fetch_checkpoint(info.uri, Path(tmp))).state
    assert info.step == 8
    assert recorded.param_groups[0]["betas"] == [0.8, 0.9]
    assert recorded.param_groups[0]["initial_lr"] == 5e-4
    assert recorded.scheduler["base_lrs"] == [5e-4]


def test_a_new_run_from_a_checkpoint_on_other_data_starts_the_data_order_afresh(
    tmp_path: Path,
    demo_dataset: str,
    lerobot_dataset: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`checkpoint.from_checkpoint` on another dataset and batch size (a finetune of a
    finetune): the checkpoint's data position means nothing there, so the new run's data
    order starts at its beginning, and says so; the weights, optimizer and step carry on."""
    first = spec_for(demo_dataset, tmp_path, "first", train={"steps": 4, "log_every": 2})
    assert train_in_process(first)[0] is not None
    source = list_checkpoints(run_uri(str(tmp_path), "first"))[-1].uri
    second = spec_for(
        lerobot_dataset, tmp_path, "second",
        train={"steps": 8, "log_every": 2, "batch_size": 2},
        checkpoint={"storage": str(tmp_path), "every_steps": 4, "from_checkpoint": source},
    )  # fmt: skip
    capsys.readouterr()
    state, _ = train_in_process(second)
    assert state is not None and state.step == 8 and state.resumed_from_step == 4
    out = capsys.readouterr().out
    assert "resume: the data order starts afresh (epoch 0): this run changes" in out
    assert "data.uri" in out and "train.batch_size" in out

    # On the same data and batch a new run from the checkpoint goes on from its position.
    third = spec_for(
        demo_dataset, tmp_path, "third", train={"steps": 6, "log_every": 2},
        checkpoint={"storage": str(tmp_path), "every_steps": 2, "from_checkpoint": source},
    )  # fmt: skip
    capsys.readouterr()
    assert train_in_process(third)[0] is not None
    assert "data order starts afresh" not in capsys.readouterr().out
