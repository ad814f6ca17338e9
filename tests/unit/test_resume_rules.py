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
    resumed_spec,
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


def scaled(tmp_path: Path, workers: int, **train: Any) -> dict[str, Any]:
    """The public dict of `spec` on `workers` workers."""
    return (
        spec(tmp_path, **train)
        .model_copy(
            update={"scaling": spec(tmp_path).scaling.model_copy(update={"num_workers": workers})}
        )
        .public_dict()
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


def test_the_ema_may_be_turned_on_at_a_resume_not_off(tmp_path: Path) -> None:
    off, on = spec(tmp_path), spec(tmp_path, ema={"enable": True, "decay": 0.99})
    lines = check_resume_changes(off.public_dict(), on.public_dict(), checkpoint_uri="ckpt")
    assert lines == [
        "resume: train.ema.enable: false -> true (the EMA starts from the weights of the "
        "resumed step)",
        "resume: train.ema.decay: 0.999 -> 0.99 (the EMA continues with the new decay from "
        "the next update)",
    ]
    with pytest.raises(ResumeRefused) as err:
        check_resume_changes(on.public_dict(), off.public_dict(), checkpoint_uri="ckpt")
    message = str(err.value)
    assert "train.ema.enable: true -> false (the checkpoint holds the run's EMA" in message
    assert "checkpoint.from_checkpoint" in message
    assert "train.ema.decay" not in message  # applied, whichever way


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


KEPT = "the global batch of 8 samples (train.batch_size 4 x grad_accum_steps 1 x 2 worker(s))"


def test_another_worker_count_keeps_the_global_batch(tmp_path: Path) -> None:
    """A checkpoint of 2 workers x 4 resumes on 1 worker x 8 or 4 x 2: batch_size left as
    recorded is derived (announced), or set by the user to the same global batch."""
    recorded = scaled(tmp_path, 2)
    one = resumed_spec(recorded, scaled(tmp_path, 1))
    assert (one["train"]["batch_size"], one["scaling"]["num_workers"]) == (8, 1)
    assert resumed_spec(recorded, scaled(tmp_path, 4))["train"]["batch_size"] == 2
    assert resumed_spec(recorded, scaled(tmp_path, 1, batch_size=8))["train"]["batch_size"] == 8
    assert resumed_spec(recorded, scaled(tmp_path, 2))["train"]["batch_size"] == 4  # unchanged
    lines = [
        f"resume: train.batch_size: 4 -> 8 (derived: {KEPT} is kept on 1 worker(s))",
        "resume: scaling.num_workers: 2 -> 1 (the global batch is kept: each worker's "
        "train.batch_size is derived from it, and the data order goes on from the same sample)",
    ]
    for current in (scaled(tmp_path, 1), scaled(tmp_path, 1, batch_size=8), one):
        assert check_resume_changes(recorded, current, checkpoint_uri="ckpt") == lines
    accumulated = scaled(tmp_path, 2, grad_accum_steps=3)  # global batch 24
    four = resumed_spec(accumulated, scaled(tmp_path, 4, grad_accum_steps=3))
    assert four["train"]["batch_size"] == 2  # 2 x 3 x 4 workers: the global batch of 24


def test_a_global_batch_that_does_not_divide_is_refused_naming_the_worker_counts(
    tmp_path: Path,
) -> None:
    recorded = scaled(tmp_path, 2)
    assert resumed_spec(recorded, scaled(tmp_path, 3))["train"]["batch_size"] == 4  # left alone
    with pytest.raises(ResumeRefused) as err:
        check_resume_changes(recorded, scaled(tmp_path, 3), checkpoint_uri="ckpt")
    assert (
        f"scaling.num_workers: 2 -> 3 ({KEPT} does not divide across 3 workers; resume with "
        "scaling.num_workers 1, 2, 4, 8 (each worker then takes 8 / num_workers samples per "
        "micro-batch))"
    ) in str(err.value)
    # A batch the user set that changes the global batch is refused as a batch change.
    with pytest.raises(ResumeRefused) as err:
        check_resume_changes(recorded, scaled(tmp_path, 1, batch_size=6), checkpoint_uri="ckpt")
    message = str(err.value)
    assert "train.batch_size: 4 -> 6 (the data cursor counts global batches" in message
    assert "scaling.num_workers: 2 -> 1" not in message  # applied: not in the refusal
    # grad_accum_steps stays refused: it would move the epoch's end (batch x workers).
    with pytest.raises(ResumeRefused, match=r"train.grad_accum_steps: 1 -> 2"):
        check_resume_changes(
            recorded, scaled(tmp_path, 1, grad_accum_steps=2), checkpoint_uri="ckpt"
        )


def test_run_on_a_worker_count_that_does_not_divide_exits_2_before_ray(
    tmp_path: Path, demo_dataset: str
) -> None:
    """`smolvla-ray run` checks the newest checkpoint's spec before Ray starts."""
    import ray
    import yaml
    from typer.testing import CliRunner

    from smolvla_ray.cli import app
    from smolvla_ray.driver import resolve_local_paths

    job = spec_from_dict(
        {
            "name": "run",
            "policy": {"preset": "tiny"},
            "data": {"uri": demo_dataset, "num_loader_workers": 0},
            "train": {"steps": 10, "batch_size": 4},
            "scaling": {"num_workers": 2},
            "checkpoint": {"storage": str(tmp_path / "runs")},
        }
    )
    fake_checkpoint(tmp_path / "runs" / "run", 4, resolve_local_paths(job).public_dict())
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(job.public_dict()))
    result = CliRunner().invoke(app, ["run", str(path), "--set", "scaling.num_workers=3"])
    output = " ".join(result.output.split())
    assert result.exit_code == 2, (output, result.exception)
    assert "scaling.num_workers: 2 -> 3" in output
    assert "resume with scaling.num_workers 1, 2, 4, 8" in output
    assert not ray.is_initialized()


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
