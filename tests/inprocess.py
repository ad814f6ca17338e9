"""Running the trainer in this process, without Ray: a single-process gloo group and a
reporter that records every report and uploads rank 0's checkpoints to the run directory as
Ray's would (manifest last, `checkpoint_<step>` names)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import fsspec
import torch.distributed as dist

from smolvla_ray.checkpoint.writer import upload_checkpoint
from smolvla_ray.run_layout import checkpoint_dir_name, run_uri
from smolvla_ray.settings import RunSettings
from smolvla_ray.spec import JobSpec
from smolvla_ray.train.checkpointer import TrainState
from smolvla_ray.train.trainer import WorkerContext, train


class LocalReporter:
    """Records reports; uploads checkpoints into `<storage>/<name>/checkpoint_<step>`."""

    def __init__(self, spec: JobSpec, *, stop_after: int | None = None) -> None:
        self.run = run_uri(spec.checkpoint.storage, spec.name)
        self.fs, _ = fsspec.core.url_to_fs(self.run, **spec.storage_options_plain())
        self.reports: list[dict[str, Any]] = []
        self.stop_after = stop_after

    def report(
        self,
        metrics: Mapping[str, Any],
        checkpoint: Path | None,
        *,
        save: bool,
        sync: bool,
        validate: bool = False,
    ) -> None:
        self.reports.append(dict(metrics))
        if checkpoint is not None:
            _, root = fsspec.core.url_to_fs(self.run)
            upload_checkpoint(checkpoint, self.fs, f"{root}/{checkpoint_dir_name(metrics['step'])}")
            shutil.rmtree(checkpoint)
        if self.stop_after is not None and metrics["step"] >= self.stop_after:
            raise Killed(f"killed after the report of step {metrics['step']}")

    def validated(self, *, wait: bool) -> list[tuple[int, dict[str, float]]]:
        return []  # async evaluation needs Ray Train's validation tasks


class Killed(RuntimeError):
    """What a test raises to stop a run mid-way, as a killed worker would."""


@contextlib.contextmanager
def single_process_group() -> Iterator[None]:
    """A gloo process group of one rank (DDP needs one), unless one exists already."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def train_in_process(
    spec: JobSpec, *, stop_after: int | None = None, feature_cache: str | None = None
) -> tuple[TrainState | None, LocalReporter]:
    """Train `spec` here, as a Ray worker would (its `RunSettings`); with `stop_after`, the
    run is killed after that step's report."""
    reporter = LocalReporter(spec, stop_after=stop_after)
    context = WorkerContext(
        storage_options=spec.storage_options_plain(), feature_cache=feature_cache
    )
    with single_process_group():
        try:
            return train(RunSettings.from_spec(spec), reporter, context), reporter
        except Killed:
            return None, reporter


def recorded(order: list[str], what: str, call):
    """`call`, appending `what` to `order` each time it is called (to test call order)."""

    def wrapper(*args, **kwargs):
        order.append(what)
        return call(*args, **kwargs)

    return wrapper


def record_episodes(monkeypatch) -> tuple[list[int], list[int]]:
    """The episode index of every sample the trainer trains on and of every sample it
    evaluates, recorded as the batches are read (checked sample by sample by tests)."""
    from smolvla_ray.data.loader import ShardedLoader
    from smolvla_ray.train.evaluation import HeldOut

    trained: list[int] = []
    evaluated: list[int] = []
    real_iter, real_batches = ShardedLoader.__iter__, HeldOut.batches

    def training_batches(loader):
        for batch in real_iter(loader):
            trained.extend(batch["episode_index"].tolist())
            yield batch

    def held_out_batches(held_out, **kwargs):
        for batch in real_batches(held_out, **kwargs):
            evaluated.extend(batch["episode_index"].tolist())
            yield batch

    monkeypatch.setattr(ShardedLoader, "__iter__", training_batches)
    monkeypatch.setattr(HeldOut, "batches", held_out_batches)
    return trained, evaluated
