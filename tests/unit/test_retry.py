"""Storage retries on a real local fsspec filesystem that fails its first calls, the
manifest-last upload, and the refusal to checkpoint non-finite tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fsspec.implementations.local import LocalFileSystem

from smolvla_ray.checkpoint.discovery import inspect_checkpoint
from smolvla_ray.checkpoint.format import MANIFEST, TrainingState, write_checkpoint
from smolvla_ray.checkpoint.writer import upload_checkpoint
from smolvla_ray.storage import (
    RETRY_BUDGET_ENV,
    StorageUnavailableError,
    retry_budget_s,
    with_retries,
)


class FlakyLocalFileSystem(LocalFileSystem):
    """The local filesystem, but `put_file` fails with a connection error `failures` times
    (or on every call to `fail_on` once it starts failing), recording what landed."""

    def __init__(self, failures: int = 0, *, fail_always_on: str | None = None) -> None:
        super().__init__(skip_instance_cache=True)
        self.failures = failures
        self.fail_always_on = fail_always_on
        self.landed: list[str] = []
        self.calls = 0

    def put_file(self, lpath, rpath, **kwargs):  # type: ignore[override]
        self.calls += 1
        if self.failures > 0 or (self.fail_always_on and rpath.endswith(self.fail_always_on)):
            self.failures -= 1
            raise ConnectionError(f"connection refused while writing {rpath}")
        super().put_file(lpath, rpath, **kwargs)
        self.landed.append(Path(rpath).name)


def _state(step: int = 3) -> TrainingState:
    return TrainingState(
        step=step, epoch=0, cursors=[{}], param_names=["w"], param_groups=[], scheduler={},
        spec={}, policy_config={}, base={},
    )  # fmt: skip


def _checkpoint(directory: Path) -> Path:
    write_checkpoint(
        directory,
        trainable={"w": torch.ones(4)},
        optimizer={"exp_avg/w": torch.zeros(4)},
        rng_states=[torch.get_rng_state()],
        state=_state(),
    )
    return directory


def no_sleep(_: float) -> None:
    pass


def test_transient_errors_are_retried_then_succeed() -> None:
    outcomes = [ConnectionError("reset"), TimeoutError("slow"), "ok"]

    def call() -> str:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert with_retries(call, what="test call", budget_s=60, sleep=no_sleep) == "ok"


@pytest.mark.parametrize("error", [FileNotFoundError("gone"), PermissionError("denied")])
def test_permanent_errors_are_not_retried(error: Exception) -> None:
    calls = []

    def call() -> None:
        calls.append(1)
        raise error

    with pytest.raises(type(error)):
        with_retries(call, what="test call", budget_s=60, sleep=no_sleep)
    assert len(calls) == 1


def test_outage_past_the_budget_fails_naming_what_and_why() -> None:
    def call() -> None:
        raise ConnectionError("connection refused")

    with pytest.raises(StorageUnavailableError) as info:
        with_retries(call, what="upload of s3://b/run/x", budget_s=0.3, first_delay_s=0.05)
    message = str(info.value)
    assert "upload of s3://b/run/x" in message and "connection refused" in message
    assert RETRY_BUDGET_ENV in message


def test_budget_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(RETRY_BUDGET_ENV, "7.5")
    assert retry_budget_s() == 7.5
    monkeypatch.setenv(RETRY_BUDGET_ENV, "soon")
    with pytest.raises(ValueError, match=RETRY_BUDGET_ENV):
        retry_budget_s()


def test_upload_retries_each_file_and_writes_the_manifest_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("smolvla_ray.storage.FIRST_DELAY_S", 0.01)
    local = _checkpoint(tmp_path / "local")
    fs = FlakyLocalFileSystem(failures=2)
    upload_checkpoint(local, fs, str(tmp_path / "remote" / "checkpoint_000000003"))
    assert fs.calls == len(fs.landed) + 2
    assert fs.landed[-1] == MANIFEST and sorted(fs.landed) == sorted(
        p.name for p in local.iterdir()
    )
    assert inspect_checkpoint(str(tmp_path / "remote" / "checkpoint_000000003")).valid


def test_upload_cut_before_the_manifest_leaves_an_invalid_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(RETRY_BUDGET_ENV, "0.2")
    monkeypatch.setattr("smolvla_ray.storage.FIRST_DELAY_S", 0.05)
    local = _checkpoint(tmp_path / "local")
    remote = tmp_path / "remote" / "checkpoint_000000003"
    fs = FlakyLocalFileSystem(fail_always_on=MANIFEST)
    with pytest.raises(StorageUnavailableError, match="manifest.json"):
        upload_checkpoint(local, fs, str(remote))
    assert MANIFEST not in fs.landed and len(fs.landed) == len(list(local.iterdir())) - 1
    info = inspect_checkpoint(str(remote))
    assert not info.valid and "no manifest.json" in (info.problem or "")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_checkpoint_never_holds_non_finite_values(tmp_path: Path, bad: float) -> None:
    weights = torch.ones(4)
    weights[2] = bad
    expected = r"non-finite values.*trainable parameters at step 3, e\.g\. \['w'\]"
    with pytest.raises(RuntimeError, match=expected):
        write_checkpoint(
            tmp_path / "c",
            trainable={"w": weights},
            optimizer={"exp_avg/w": torch.zeros(4)},
            rng_states=[torch.get_rng_state()],
            state=_state(),
        )
    assert not (tmp_path / "c").exists()
    moments = {"exp_avg_sq/w": torch.full((4,), bad)}
    with pytest.raises(RuntimeError, match="optimizer state"):
        write_checkpoint(
            tmp_path / "d",
            trainable={"w": torch.ones(4)},
            optimizer=moments,
            rng_states=[torch.get_rng_state()],
            state=_state(),
        )
