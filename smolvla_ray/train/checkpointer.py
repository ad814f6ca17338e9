"""The trainer's checkpointer: where a run resumes from, restoring that state, when to save,
and writing a checkpoint of what training changed. It never talks to Ray: the trainer hands
the written directory to its reporter, which uploads it.

Resume discovery is the run directory's newest checkpoint whose manifest verifies, else
`checkpoint.from_checkpoint`; a checkpoint trained on another base (commit or frozen
fingerprint) is refused, since its trained tensors mean nothing on another backbone. Spec
changes since the checkpoint (its recorded spec against the run's `spec_json`) follow one
table (`checkpoint/resume.py`): refused on a resume of the run's own checkpoint, otherwise
applied (the optimizer's hyperparameters are set on the restored optimizer) and announced.
A resume on another number of workers keeps the run's global batch (`resume_settings`) and
reads the data cursor, a global position, whatever rank it is on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from smolvla_ray.checkpoint.base import base_identity, check_resume_base
from smolvla_ray.checkpoint.discovery import fetch_checkpoint, latest_valid_checkpoint
from smolvla_ray.checkpoint.format import LoadedCheckpoint, load_optimizer_state, read_checkpoint
from smolvla_ray.checkpoint.resume import (
    check_resume_changes,
    resume_changes_of,
    resumed_spec,
    spec_changes,
)
from smolvla_ray.checkpoint.writer import CheckpointWriter
from smolvla_ray.policy.modeling import SmolVLAPolicy
from smolvla_ray.scratch import make_scratch_dir, scratch_tempdir
from smolvla_ray.settings import OptimizerSettings, RunSettings
from smolvla_ray.train.ema import WeightEMA


@dataclass
class TrainState:
    """The counters of a run that a checkpoint carries (besides tensors and cursors)."""

    step: int = 0
    epoch: int = 0
    skipped_steps: int = 0
    resumed_from_step: int = 0
    # Held-out evaluation: the best value of `eval.metric` so far, its step, and the
    # evaluations since it (patience); `evaluation` is this step's result, when it has one.
    best_metric: float | None = None
    best_of: str | None = None  # "<metric> <mode>" the best was ranked by
    best_step: int | None = None
    evals_since_best: int = 0
    evaluation: dict[str, float] = field(default_factory=dict)
    evaluation_log: dict[str, float] = field(default_factory=dict)  # async results to log

    def counters(self) -> dict[str, Any]:
        """What every metrics record and checkpoint carries."""
        out: dict[str, Any] = {
            "skipped_steps": self.skipped_steps,
            "resumed_from_step": self.resumed_from_step,
        }
        if self.best_step is not None:
            out.update(
                best_metric=self.best_metric,
                best_of=self.best_of,
                best_step=self.best_step,
                evals_since_best=self.evals_since_best,
            )
        return out

    def record_evaluation(
        self, summary: dict[str, float], *, metric: str, mode: str, step: int | None = None
    ) -> bool:
        """Keep an evaluation: this step's (inline; the checkpoint of this step carries it),
        or, with `step`, an earlier checkpoint's (async). True when it is the best so far by
        `metric`."""
        if step is None:
            self.evaluation = dict(summary)
        value = summary[metric]
        if self.best_of != f"{metric} {mode}":  # a new ranking (first, or changed on resume)
            self.best_metric, self.best_step, self.evals_since_best = None, None, 0
            self.best_of = f"{metric} {mode}"
        better = self.best_metric is None or (
            value < self.best_metric if mode == "min" else value > self.best_metric
        )
        if better:
            self.best_metric, self.best_step = value, self.step if step is None else step
            self.evals_since_best = 0
        else:
            self.evals_since_best += 1
        return better


@dataclass
class Restored:
    """What a resume hands the trainer: its state and the source (the loader's cursor came
    before, from `data_cursor`)."""

    state: TrainState
    source: str | None = None
    changes: list[str] = field(default_factory=list)
    """One line per spec change applied on this resume (rank 0 announces them)."""


def resume_source(settings: RunSettings, storage_options: Mapping[str, Any]) -> str | None:
    """The newest verified checkpoint of the run, else `checkpoint.from_checkpoint`."""
    info = latest_valid_checkpoint(settings.run_uri, storage_options)
    if info is not None:
        return info.uri
    return settings.checkpoint.from_checkpoint


def load_checkpoint(uri: str, storage_options: Mapping[str, Any]) -> LoadedCheckpoint:
    """`uri`'s content in host memory; the trainer reads its data cursor from it before it
    builds anything that needs a collective, and restores it later (`Checkpointer.restore`)."""
    with scratch_tempdir("resume") as tmp:
        return read_checkpoint(fetch_checkpoint(uri, Path(tmp), storage_options))


def resume_changes(settings: RunSettings, uri: str, loaded: LoadedCheckpoint) -> list[str]:
    """The spec changes since `loaded` was written, one line each: refused (ResumeRefused)
    on a resume of the run's own checkpoint where the table says so, else applied. The
    trainer asks before it builds a loader from the checkpoint's cursor, so a refused change
    (say, the batch size) is reported as such, not as a cursor mismatch. A new run from
    `checkpoint.from_checkpoint` only announces; where it changes what a resume could not
    (its data, seed or batch), its data order starts afresh (`data_cursor`), announced too."""
    recorded, current = loaded.state.spec, settings.spec_json
    if uri == settings.checkpoint.from_checkpoint:  # a new run: only announce
        lines = [f"resume: {c.describe()}" for c in spec_changes(recorded, current) if c.applied]
        fresh = _fresh_data_order(settings, uri, loaded)
        if fresh:
            lines.append(
                "resume: the data order starts afresh (epoch 0): this run changes "
                f"{', '.join(fresh)} against the checkpoint, so its data position does not apply"
            )
        return lines
    # The run's own checkpoint (the driver checked it too, before Ray started).
    return check_resume_changes(recorded, current, checkpoint_uri=uri)


def _fresh_data_order(settings: RunSettings, uri: str, loaded: LoadedCheckpoint) -> list[str]:
    """The fields by which a new run from `checkpoint.from_checkpoint` differs from the
    checkpoint where a resume would be refused (data, seed, batch, held-out split, ...):
    its recorded data position means nothing under them. Empty for a resume, or a new run
    whose data order goes on from the checkpoint's position."""
    if uri != settings.checkpoint.from_checkpoint:
        return []
    changes = resume_changes_of(loaded.state.spec, settings.spec_json)
    return [c.field for c in changes if not c.applied and c.field != "checkpoint.from_checkpoint"]


def resume_settings(settings: RunSettings, uri: str, loaded: LoadedCheckpoint) -> RunSettings:
    """The settings a resume from `loaded` (`uri`'s content) trains with, after
    `resume_changes` (a refused change raises here): on the run's own checkpoint and another
    `scaling.num_workers`, each worker's `train.batch_size` is derived from the recorded
    global batch (`checkpoint/resume.resumed_spec`). A new run from
    `checkpoint.from_checkpoint` takes its settings as written."""
    resume_changes(settings, uri, loaded)
    if uri == settings.checkpoint.from_checkpoint:
        return settings
    resumed = resumed_spec(loaded.state.spec, settings.spec_json)
    return settings if resumed == settings.spec_json else RunSettings.from_spec_json(resumed)


def data_cursor(settings: RunSettings, uri: str, loaded: LoadedCheckpoint) -> dict[str, Any] | None:
    """The data cursor to go on from: `loaded`'s (epoch, global sample offset), the same on
    every rank that wrote it, so any world size with the same global batch resumes from it;
    None (the data order from its beginning) for a new run from `checkpoint.from_checkpoint`
    on other data, seed or batch."""
    if _fresh_data_order(settings, uri, loaded):
        return None
    return loaded.state.cursors[0]


class Checkpointer:
    """Resume discovery, restore, `should_save` and writing, for one worker of one run."""

    def __init__(
        self,
        settings: RunSettings,
        policy: SmolVLAPolicy,
        *,
        base_fingerprint: str,
        storage_options: Mapping[str, Any],
    ) -> None:
        self.settings = settings
        self.storage_options = dict(storage_options)
        self.base_fingerprint = base_fingerprint
        self.writer = CheckpointWriter(
            settings=settings, policy=policy, base_fingerprint=base_fingerprint
        )

    @property
    def run_uri(self) -> str:
        return self.settings.run_uri

    def restore(
        self,
        uri: str,
        loaded: LoadedCheckpoint,
        ddp,
        optimizer,
        scheduler,
        *,
        rank: int,
        world_size: int,
        ema: WeightEMA | None = None,
    ) -> Restored:
        """Put `loaded` (`uri`'s content, `load_checkpoint`) in place: trainable tensors,
        optimizer, scheduler, (on the same number of workers) this rank's RNG and the
        EMA (`ema`, when the run keeps one), after checking it was trained on this run's
        base."""
        current = base_identity(self.settings.policy, self.base_fingerprint)
        check_resume_base(loaded.state.base, current, checkpoint_uri=uri)
        restored = _restore(
            loaded, ddp, optimizer, scheduler, rank=rank, world_size=world_size, source=uri
        )
        apply_optimizer_settings(self.settings.train.optimizer, optimizer, scheduler)
        restored.changes = resume_changes(self.settings, uri, loaded)
        restored.changes += _restore_ema(ema, loaded, ddp.module.names)
        return restored

    def should_save(self, step: int, *, interrupt: bool = False) -> bool:
        """At `checkpoint.every_steps`, at the last step, and when an interrupt asks."""
        every = self.settings.checkpoint.every_steps
        last = step == self.settings.train.steps
        return last or interrupt or bool(every and step % every == 0)

    def write(
        self,
        state: TrainState,
        *,
        cursors: list[dict[str, Any]],
        rng_states: list[torch.Tensor],
        ddp,
        optimizer,
        scheduler,
        ema: WeightEMA | None = None,
    ) -> Path:
        """A new local directory holding this step's checkpoint (the reporter uploads it and
        deletes it)."""
        return self.writer.write(
            make_scratch_dir("ckpt"),
            step=state.step,
            epoch=state.epoch,
            cursors=cursors,
            rng_states=rng_states,
            ddp=ddp,
            optimizer=optimizer,
            scheduler=scheduler,
            # The checkpoint's own evaluation (made at this step, before the save), which
            # best-checkpoint retention and `smolvla-ray checkpoints` read.
            counters={**state.counters(), "evaluation": state.evaluation},
            ema=ema.tensors(ddp.module.names) if ema is not None else None,
        )


def _restore_ema(ema: WeightEMA | None, loaded: LoadedCheckpoint, names: list[str]) -> list[str]:
    """The checkpoint's EMA put in place (exactly: a resumed EMA equals an uninterrupted
    one's), or, where it has none (the EMA turned on since), the EMA started from the
    restored weights. Returns what the spec changes' lines do not already announce: an EMA
    dropped by a new run from `checkpoint.from_checkpoint` (a resume refuses that)."""
    if ema is None:
        if loaded.ema is None:
            return []
        return [
            f"resume: the checkpoint's EMA (step {loaded.state.step}) is not used: "
            "train.ema.enable is false"
        ]
    if loaded.ema is None:
        ema.reset()  # the parameters hold the restored weights by now
    else:
        ema.load(loaded.ema, names)
    return []


def _restore(
    loaded: LoadedCheckpoint, ddp, optimizer, scheduler, *, rank: int, world_size: int, source: str
) -> Restored:
    state = loaded.state
    names: list[str] = ddp.module.names
    if state.param_names != names:
        raise RuntimeError(
            "the checkpoint's trainable parameters differ from this policy's: was it written "
            "with other freezing overrides? "
            f"{sorted(set(state.param_names) ^ set(names))[:5]}"
        )
    with torch.no_grad():
        for name, param in zip(names, ddp.module.params, strict=True):
            param.copy_(loaded.trainable[name].to(param.device, param.dtype))
    load_optimizer_state(optimizer, loaded.optimizer, names, state.param_groups)
    groups = len(optimizer.param_groups)
    scheduler.load_state_dict({**state.scheduler, "lr_lambdas": [None] * groups})
    # No result of training depends on torch's global RNG (noise and time are keyed by
    # (seed, step, sample), augmentation by (seed, epoch, sample, camera); the loader
    # processes' seeds, drawn from it, key nothing), so on another number of workers, where
    # rank r is not the worker that saved state r, no state is restored.
    if len(loaded.rng_states) == world_size:
        torch.set_rng_state(loaded.rng_states[rank])
    counters = dict(state.counters)
    best_step = counters.get("best_step")
    train_state = TrainState(
        step=state.step,
        epoch=state.epoch,
        skipped_steps=int(counters.get("skipped_steps", 0)),
        resumed_from_step=state.step,
        best_metric=counters.get("best_metric"),
        best_of=counters.get("best_of"),
        best_step=int(best_step) if best_step is not None else None,
        evals_since_best=int(counters.get("evals_since_best", 0)),
    )
    return Restored(train_state, source)


def apply_optimizer_settings(opt: OptimizerSettings, optimizer, scheduler) -> None:
    """Set this run's optimizer hyperparameters on a restored optimizer, whose param groups
    came from the checkpoint, and continue the schedule at the current step with this
    run's peak lr. Unchanged values give the very same lr (resume stays exact)."""
    for group in optimizer.param_groups:
        group.update(
            betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay, initial_lr=opt.lr
        )
    scheduler.base_lrs = [opt.lr] * len(optimizer.param_groups)
    step = scheduler.last_epoch
    lrs = [
        base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
    ]
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() answers
