"""What may change on resume (checkpoint/resume.py) and the repair of a run directory whose
Ray Train state names checkpoints that are gone or broken (checkpoint/recovery.py); on
hand-made run directories, without training or Ray."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from smolvla_ray.checkpoint.format import MANIFEST, REQUIRED_FILES, STATE
from smolvla_ray.checkpoint.recovery import recover_run_dir
from smolvla_ray.checkpoint.resume import (
    RESUME_RULES,
    ResumeRefused,
    check_resume_changes,
    rule_for,
    spec_changes,
)
from smolvla_ray.prepare import check_resume_spec
from smolvla_ray.run_layout import RAY_RUN_STATE, checkpoint_dir_name
from smolvla_ray.spec import JobSpec, spec_from_dict
from smolvla_ray.spec.job import schema_child


def spec(tmp_path: Path, **train: Any) -> JobSpec:
    return spec_from_dict(
        {
            "name": "run",
            "policy": {"preset": "tiny"},
            "data": {"uri": str(tmp_path / "data")},
            "train": {"steps": 10, "batch_size": 4, **train},
            "checkpoint": {"storage": str(tmp_path / "runs")},
        }
    )


def leaf_fields(model: type[BaseModel] = JobSpec, prefix: str = "") -> list[str]:
    out = []
    for name, info in model.model_fields.items():
        child = schema_child(info.annotation)
        path = f"{prefix}{name}"
        if isinstance(child, type):
            out += leaf_fields(child, f"{path}.")
        else:  # a value, or a free-form mapping (covered as a whole)
            out.append(path)
    return out


def test_every_spec_field_has_a_rule_and_every_rule_a_field() -> None:
    fields = leaf_fields()
    assert [f for f in fields if rule_for(f) is None] == []
    for key in RESUME_RULES:
        assert any(f == key or f.startswith(f"{key}.") for f in fields), key


def test_applied_changes_are_announced_and_the_others_refused(tmp_path: Path) -> None:
    recorded = spec(tmp_path).public_dict()
    lr = spec(tmp_path, optimizer={"lr": 5e-4}, steps=20).public_dict()
    lines = check_resume_changes(recorded, lr, checkpoint_uri="ckpt")
    assert lines == [
        "resume: train.steps: 10 -> 20 (the run is extended or shortened; a schedule fitted "
        "to the run's length (steps < decay_steps) is refitted and continues at the current "
        "step)",
        "resume: train.optimizer.lr: 0.0001 -> 0.0005 (set on the restored optimizer; the "
        "schedule continues at the new peak lr)",
    ]
    same = spec(tmp_path).public_dict()
    assert check_resume_changes(recorded, same, checkpoint_uri="ckpt") == []

    changed = spec(tmp_path, batch_size=8, seed=3, optimizer={"lr": 5e-4}).public_dict()
    with pytest.raises(ResumeRefused) as err:
        check_resume_changes(recorded, changed, checkpoint_uri="ckpt")
    message = str(err.value)
    assert "train.batch_size: 4 -> 8 (the data cursor counts" in message
    assert "train.seed: 1000 -> 3" in message and "train.optimizer.lr" not in message
    assert "start a new run" in message and "What may change on resume" in message


def test_a_field_the_table_does_not_name_is_refused(tmp_path: Path) -> None:
    recorded = spec(tmp_path).public_dict()
    recorded["train"]["momentum"] = 0.9  # recorded by some other version
    current = spec(tmp_path).public_dict()
    (change,) = spec_changes(recorded, current)
    assert change.field == "train.momentum" and not change.applied
    with pytest.raises(ResumeRefused, match=r"train.momentum: 0.9 -> \(unset\) \(the table"):
        check_resume_changes(recorded, current, checkpoint_uri="ckpt")


def fake_checkpoint(run: Path, step: int, recorded: dict[str, Any] | None = None) -> Path:
    """A checkpoint directory whose files match its manifest (not loadable tensors)."""
    directory = run / checkpoint_dir_name(step)
    directory.mkdir(parents=True)
    for name in REQUIRED_FILES:
        (directory / name).write_bytes(f"{name} {step}".encode())
    (directory / STATE).write_text(json.dumps({"step": step, "spec": recorded or {}}))
    files = {
        p.name: {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in directory.iterdir()
    }
    (directory / MANIFEST).write_text(json.dumps({"step": step, "files": files}))
    return directory


def test_the_driver_reads_the_newest_checkpoints_spec(tmp_path: Path) -> None:
    job = spec(tmp_path)
    options: dict[str, Any] = {}
    assert check_resume_spec(job, options) == []  # nothing to resume
    run = tmp_path / "runs" / "run"
    fake_checkpoint(run, 2, spec(tmp_path, batch_size=2).public_dict())
    fake_checkpoint(run, 4, job.public_dict())
    assert check_resume_spec(job, options) == []
    with pytest.raises(
        ResumeRefused, match=r"(?s)checkpoint_000000004: .*train.batch_size: 4 -> 8"
    ):
        check_resume_spec(spec(tmp_path, batch_size=8), options)
    (run / checkpoint_dir_name(4) / STATE).write_text("{}")  # broken: the older one counts
    with pytest.raises(ResumeRefused, match=r"train.batch_size: 2 -> 4"):
        check_resume_spec(job, options)


def snapshot(run: Path, *names: str) -> None:
    results = [{"checkpoint_dir_name": n, "metrics": {}} for n in names]
    state = {"checkpoint_results": results, "latest_checkpoint_result": results[-1]}
    (run / RAY_RUN_STATE).write_text(json.dumps(state))


def test_ray_state_naming_missing_or_broken_checkpoints_is_moved_aside(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    assert recover_run_dir(str(run), {}) is None  # no Ray state
    two, four = fake_checkpoint(run, 2), fake_checkpoint(run, 4)
    snapshot(run, two.name, four.name)
    assert recover_run_dir(str(run), {}) is None  # all there and valid: left alone

    (four / REQUIRED_FILES[0]).write_bytes(b"cut")
    line = recover_run_dir(str(run), {}, now=lambda: 0.0)
    assert line == (
        "resuming from step 2; ignoring invalid (checkpoint_000000004: trainable.safetensors "
        "has 3 bytes, manifest says 23); Ray Train's stale run state moved to "
        f"{RAY_RUN_STATE}.stale-19700101T000000"
    )
    assert not (run / RAY_RUN_STATE).exists() and four.exists()  # checkpoints stay

    # Deleted by hand; a second repair in the same second keeps the first one's file.
    snapshot(run, two.name, four.name)
    for directory in (two, four):
        for file in directory.iterdir():
            file.unlink()
        directory.rmdir()
    line = recover_run_dir(str(run), {}, fallback="/old/checkpoint_000000009", now=lambda: 0.0)
    assert line is not None and line.startswith(
        f"no checkpoint of {run} verifies (checkpoint_000000002: missing, checkpoint_000000004: "
        "missing); starting from /old/checkpoint_000000009;"
    )
    assert sorted(p.name for p in run.iterdir()) == [
        f"{RAY_RUN_STATE}.stale-19700101T000000",
        f"{RAY_RUN_STATE}.stale-19700101T000000-1",
    ]

    (run / RAY_RUN_STATE).write_text("{not json")
    line = recover_run_dir(str(run), {})
    assert line is not None and f"{RAY_RUN_STATE}: unreadable" in line
