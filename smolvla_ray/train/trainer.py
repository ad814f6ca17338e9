"""The training loop of one worker, without Ray.

`train` builds the policy (freezing overrides, resolved features), checks the frozen backbone
is the same everywhere, wraps the trainable view in DDP, resumes, and steps. Every
`log_every` steps and at checkpoint steps all ranks hand a metrics record (and rank 0 a
checkpoint directory) to the injected `Reporter`: `train/loop.py` adapts it to Ray Train's
`report`; tests pass their own and run the whole finetune in-process. The process group
must exist (Ray Train's TorchConfig makes it; in-process, a single-process gloo group).

See docs/design.md for where this sits in the data flow.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from smolvla_ray.build import build_policy, open_dataset
from smolvla_ray.data.meta import DatasetMeta
from smolvla_ray.policy.fingerprint import (
    check_frozen_fingerprint,
    frozen_fingerprint,
    tensors_digest,
)
from smolvla_ray.policy.modeling import SmolVLAPolicy
from smolvla_ray.progress_line import PREFIX, format_progress_line
from smolvla_ray.run_layout import checkpoint_dir_name
from smolvla_ray.settings import RunSettings
from smolvla_ray.train.checkpointer import (
    Checkpointer,
    TrainState,
    data_cursor,
    load_checkpoint,
    resume_settings,
    resume_source,
)
from smolvla_ray.train.ddp import CommCounter, collective_timeout_s, wrap_ddp
from smolvla_ray.train.ema import WeightEMA
from smolvla_ray.train.evaluation import HeldOut, evaluate_held_out, write_table
from smolvla_ray.train.interrupt import Decision
from smolvla_ray.train.metrics import MetricsLog
from smolvla_ray.train.optim import build_optimizer, build_scheduler
from smolvla_ray.train.sample_log import append_samples, sample_log_path
from smolvla_ray.train.setup import build_held_out, build_loader, fetch_feature_cache
from smolvla_ray.train.step import train_step
from smolvla_ray.train.window import MetricWindow


def say(message: str) -> None:
    """One progress line to stdout (under Ray, forwarded to the driver). Not `print`: Ray
    Train patches it into a logger *and* the stream, doubling every line."""
    sys.stdout.write(f"{PREFIX} {message}\n")
    sys.stdout.flush()


class Reporter(Protocol):
    """Where the trainer's reports go; every rank calls it equally often."""

    def report(
        self,
        metrics: Mapping[str, Any],
        checkpoint: Path | None,
        *,
        save: bool,
        sync: bool,
        validate: bool = False,
    ) -> None:
        """`metrics` of this report; `checkpoint` a local directory (rank 0 at checkpoint
        steps, else None) to upload and delete; `save`: a checkpoint step on every rank;
        `sync`: the upload must finish before returning (an interrupt checkpoint);
        `validate`: evaluate the checkpoint asynchronously (`eval.mode: async`)."""

    def validated(self, *, wait: bool) -> list[tuple[int, dict[str, float]]]:
        """Rank 0: the async evaluations finished since the last call, by checkpoint step
        (`wait`: also the last checkpoint's, at the run's end)."""


class Interrupter(Protocol):
    def poll(self) -> Decision: ...

    def exit_after_checkpoint(self, *, step: int, checkpoint_dir: str) -> None: ...


class NoInterrupts:
    """No SIGTERM or preemption handling (in-process runs)."""

    def poll(self) -> Decision:
        return Decision(checkpoint=False, exit=False, reason="")

    def exit_after_checkpoint(self, *, step: int, checkpoint_dir: str) -> None:
        raise AssertionError("NoInterrupts never asks to exit")


@dataclass(frozen=True)
class WorkerContext:
    """Who this worker is and what the driver handed it."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    feature_cache: str | Mapping[str, str] | None = None
    """The feature cache's root, or a mixture's roots by dataset name (None: video)."""
    sample_log: str | None = field(default_factory=sample_log_path)
    """Where each step's sample indices are appended (train/sample_log.py); None: nowhere."""


def train(
    settings: RunSettings,
    reporter: Reporter,
    context: WorkerContext | None = None,
    *,
    interrupts: Interrupter | None = None,
) -> TrainState:
    """Run (or resume) the finetune of `settings` on this worker; returns the final state."""
    context = context or WorkerContext()
    interrupts = interrupts or NoInterrupts()
    rank, device, options = context.rank, context.device, context.storage_options

    meta = open_dataset(settings, storage_options=options)
    # Resume: rank 0 finds the checkpoint and tells the others (the first collective, made
    # before any long work), and every rank loads it.
    source = _broadcast(resume_source(settings, options) if rank == 0 else None)
    loaded = load_checkpoint(source, options) if source is not None else None
    if source is not None and loaded is not None:
        # A refused change stops here, before its use; on another number of workers each
        # worker's batch is derived from the run's global batch.
        settings = resume_settings(settings, source, loaded)
    # Then everything slow that needs no other worker, before the next collective
    # (fingerprints, DDP's broadcast), so that a long download never holds the others inside
    # one until the collective timeout: the node's copy of the feature cache, the policy,
    # and this rank's first step of batches (their video files fetched).
    features = fetch_feature_cache(settings, meta, context.feature_cache, options)
    policy = build_policy(settings, meta, storage_options=options)
    loader = build_loader(
        settings, meta, policy, rank=rank, world_size=context.world_size,
        cursor=data_cursor(settings, source, loaded) if loaded is not None else None,
        storage_options=options, device=device, features=features,
    )  # fmt: skip
    batches = iter(loader)
    first_step = [next(batches) for _ in range(settings.train.grad_accum_steps)]
    held_out = build_held_out(settings, meta, policy, storage_options=options, features=features)
    w = _build(settings, context, meta, policy)  # DDP over the trainable view, optimizer, schedule
    ddp, optimizer, scheduler = w.ddp, w.optimizer, w.scheduler
    ema = WeightEMA.from_settings(settings.train.ema, ddp.module.params)  # None when off

    checkpointer = Checkpointer(
        settings, w.policy, base_fingerprint=w.base_fingerprint, storage_options=options
    )
    state = TrainState()
    if source is not None and loaded is not None:
        restored = checkpointer.restore(
            source,
            loaded,
            ddp,
            optimizer,
            scheduler,
            rank=rank,
            world_size=context.world_size,
            ema=ema,
        )
        state, loaded = restored.state, None  # the host copy is no longer needed
        if rank == 0:
            say(f"resuming at step {state.step} from {source}")
            for line in restored.changes:  # spec changes since the checkpoint, applied
                say(line)

    if rank == 0:
        trainable = sum(p.numel() for p in ddp.module.params)
        total = sum(p.numel() for p in w.policy.parameters())
        timeout = collective_timeout_s(device)
        say(
            f"{context.world_size} worker(s) on {device.type}; parameters: {total:,} total, "
            f"{trainable:,} trainable, {total - trainable:,} frozen"
            + (f"; collective timeout {timeout:g} s" if timeout is not None else "")
        )
    metrics_log = _metrics_log(settings, options) if rank == 0 else None

    # Step, report, checkpoint.
    autocast_dtype = torch.bfloat16 if settings.train.precision == "bf16" else None
    window = MetricWindow(world_size=context.world_size)
    run_start, start_step, last_report_s = time.perf_counter(), state.step, 0.0
    metrics: dict[str, Any] = {}
    async_eval = settings.eval is not None and settings.eval.mode == "async"
    while state.step < settings.train.steps:
        wait_start = time.perf_counter()
        micro = first_step or [next(batches) for _ in range(settings.train.grad_accum_steps)]
        first_step = []
        data_wait = time.perf_counter() - wait_start
        result = train_step(
            ddp, micro, optimizer=optimizer, scheduler=scheduler, step=state.step,
            seed=settings.train.seed, grad_clip_norm=settings.train.optimizer.grad_clip_norm,
            device=device, autocast_dtype=autocast_dtype,
        )  # fmt: skip
        state.step += 1
        if ema is not None:  # on the device, moved only by a step that was applied
            ema.update(state.step, result.finite)
        if context.sample_log:
            append_samples(
                context.sample_log, step=state.step, rank=rank,
                world_size=context.world_size, micro_batches=micro,
            )  # fmt: skip
        window.add(state.step, result, data_wait_s=data_wait, comm_bytes=w.comm.take())
        check = settings.train.check_replicas_every
        if check and (state.step % check == 0 or state.step == settings.train.steps):
            _check_replicas(ddp, w.policy, w.local_frozen)

        interrupt = interrupts.poll()  # agreed by all ranks
        evaluate = held_out is not None and _evaluation_step(settings, state.step, "inline")
        validate = _evaluation_step(settings, state.step, "async")  # an async one, on this step's
        save = validate or checkpointer.should_save(state.step, interrupt=interrupt.checkpoint)
        # Metrics are summarised across workers (a collective) at log_every, evaluation and
        # checkpoint steps only; of these reports, the Ray adapter passes on those that save
        # (loop.py).
        if not (save or evaluate or validate or state.step % settings.train.log_every == 0):
            continue
        state.epoch = loader.epoch
        # The window's device values are read here, not at every step (train/step.py);
        # a non-finite step was never applied, and is counted or stops the run now.
        summary, nonfinite = window.summary()
        for bad_step in nonfinite:
            _on_nonfinite(settings, state, bad_step)
        state.evaluation = {}
        patience_out = False
        if evaluate and held_out is not None:
            patience_out = _evaluate(
                settings, state, w.policy, held_out, context, autocast_dtype, ema=ema
            )
            save = save or patience_out  # the run ends here: with a checkpoint
            window.started = time.perf_counter()  # the evaluation is not training time
        arrived_any = False
        if async_eval:  # async evaluations finished since the last report, logged now
            arrived = _broadcast(reporter.validated(wait=False) if rank == 0 else None)
            arrived_any = bool(arrived)
            patience_out = _record_async(settings, state, arrived)
            save = save or patience_out
        metrics = {"step": state.step, "epoch": state.epoch, **summary, **state.evaluation,
                   **(state.evaluation_log if arrived_any else {}),
                   **state.counters(), "frozen_fingerprint": w.base_fingerprint}  # fmt: skip
        checkpoint, checkpoint_s = None, 0.0
        if save:
            start = time.perf_counter()
            cursors, rngs = _gather(loader.cursor()), _gather(torch.get_rng_state())
            if rank == 0:
                checkpoint = checkpointer.write(
                    state, cursors=cursors, rng_states=rngs, ddp=ddp, optimizer=optimizer,
                    scheduler=scheduler, ema=ema,
                )  # fmt: skip
            checkpoint_s = time.perf_counter() - start
        # report_s: the previous report's duration; with a checkpoint and sync upload it
        # includes the upload, the time training was blocked beyond the local write.
        metrics.update(
            checkpoint_s=checkpoint_s, report_s=last_report_s, peak_memory_mb=peak_memory_mb(device)
        )
        if metrics_log is not None:
            metrics_log.append(metrics)
        if rank == 0:
            done = max(state.step - start_step, 1)
            eta = (time.perf_counter() - run_start) / done * (settings.train.steps - state.step)
            line = format_progress_line(
                step=state.step,
                total_steps=settings.train.steps,
                loss=metrics["loss"],
                lr=result.lr,
                samples_per_s=metrics["samples_per_s"],
                eta_s=eta,
                checkpoint=checkpoint is not None,
            )
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        report_start = time.perf_counter()
        if validate:
            reporter.report(
                metrics, checkpoint, save=save, sync=interrupt.exit, validate=checkpoint is not None
            )
        else:
            reporter.report(metrics, checkpoint, save=save, sync=interrupt.exit)
        if interrupt.exit and dist.is_initialized():
            # Ray's report passes its barrier before rank 0 uploads: without this, a worker
            # leaving after SIGTERM could take the group down mid-upload.
            dist.barrier()
        if interrupt.stop:  # the user's stop request: the run ends here, resumable
            if rank == 0:
                say(f"stopped on request at step {state.step}: {checkpoint_dir_name(state.step)}")
            break
        if patience_out:
            if rank == 0:
                assert settings.eval is not None
                say(
                    f"stopping early at step {state.step}: {settings.eval.metric} has not improved "
                    f"for {state.evals_since_best} evaluation(s) (eval.patience="
                    f"{settings.eval.patience}); best {state.best_metric:.6g} at step "
                    f"{state.best_step}. Checkpoint: {checkpoint_dir_name(state.step)}"
                )
            break
        if interrupt.exit and state.step < settings.train.steps:
            interrupts.exit_after_checkpoint(
                step=state.step, checkpoint_dir=checkpoint_dir_name(state.step)
            )
        last_report_s = time.perf_counter() - report_start
    if async_eval and state.step == settings.train.steps:
        # The run's last evaluations, waited for: their results join the final record.
        arrived = _broadcast(reporter.validated(wait=True) if rank == 0 else None)
        _record_async(settings, state, arrived)
        if metrics_log is not None and arrived and metrics:
            metrics_log.append({**metrics, **state.evaluation_log, **state.counters()})
    if metrics_log is not None:
        metrics_log.close()
    return state


def _evaluation_step(settings: RunSettings, step: int, mode: str) -> bool:
    """Whether `step` ends with an evaluation of `mode`: every `eval.every_steps` and the
    last step."""
    ev = settings.eval
    if ev is None or ev.mode != mode:
        return False
    return step % ev.every_steps == 0 or step == settings.train.steps


def _record_async(
    settings: RunSettings, state: TrainState, arrived: list[tuple[int, dict[str, float]]]
) -> bool:
    """Record async evaluations of earlier checkpoints (their best, patience); the newest
    joins this step's metrics (`state.evaluation_log`): when several arrive between two
    reports the sinks get the newest, and every one is in the run's `eval/` tables. True
    when patience ran out."""
    assert settings.eval is not None
    state.evaluation_log = {}
    for step, summary in arrived:
        state.record_evaluation(
            summary, metric=settings.eval.metric, mode=settings.eval.metric_mode, step=step
        )
        state.evaluation_log = dict(summary)
    patience = settings.eval.patience
    return bool(arrived) and patience is not None and state.evals_since_best >= patience


def _evaluate(
    settings: RunSettings,
    state: TrainState,
    policy: SmolVLAPolicy,
    held_out: HeldOut | Mapping[str, HeldOut],
    context: WorkerContext,
    autocast_dtype: torch.dtype | None,
    *,
    ema: WeightEMA | None = None,
) -> bool:
    """Evaluate the held-out samples (a mixture's: each dataset's), sharded across the
    workers (one all-reduce per dataset), with the EMA weights when the run keeps an EMA (the
    raw ones back afterwards); record the result in `state` and rank 0's table in
    `<run>/eval/`. True when patience ran out."""
    assert settings.eval is not None
    start = time.perf_counter()
    with ema.swapped_in() if ema is not None else nullcontext():
        summary, table = evaluate_held_out(
            policy, held_out, rank=context.rank, world_size=context.world_size,
            seed=settings.train.seed, device=context.device, autocast_dtype=autocast_dtype,
        )  # fmt: skip
    weights: Literal["ema", "raw"] = "ema" if ema is not None else "raw"
    summary = {**summary, "eval/seconds": time.perf_counter() - start}
    samples = int(summary["eval/samples"])
    best = state.record_evaluation(
        summary, metric=settings.eval.metric, mode=settings.eval.metric_mode
    )
    if context.rank == 0:
        say(
            f"evaluation at step {state.step}{' of the EMA weights' if ema else ''}: loss "
            f"{summary['eval/loss']:.4f}, action MSE "
            f"{summary['eval/action_mse']:.4f} ({samples} held-out samples, "
            f"{summary['eval/seconds']:.1f} s)"
            + (" - best so far" if best else f"; best {state.best_metric:.6g} at step "
               f"{state.best_step}")
        )  # fmt: skip
        write_table(
            settings.run_uri, context.storage_options,
            step=state.step, summary=summary, table=table, best=best, weights=weights,
        )  # fmt: skip
    patience = settings.eval.patience
    return patience is not None and state.evals_since_best >= patience


@dataclass
class _Worker:
    """What `train` builds before it resumes."""

    meta: DatasetMeta
    policy: SmolVLAPolicy
    ddp: DistributedDataParallel
    comm: CommCounter
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    base_fingerprint: str  # of the float32 base, as export rebuilds and checks it
    local_frozen: dict[str, str]  # this worker's frozen tensors as held (maybe bf16)


def _build(
    settings: RunSettings,
    context: WorkerContext,
    meta: DatasetMeta,
    policy: SmolVLAPolicy | None = None,
) -> _Worker:
    """The policy (`build_policy`, with the freezing overrides, unless given) checked equal
    in its frozen backbone on every worker, DDP over its trainable view, AdamW and the
    schedule."""
    if policy is None:
        policy = build_policy(settings, meta, storage_options=context.storage_options)
    policy.train()
    policy.model.vlm_with_expert.attention_fp32 = settings.train.attention_fp32
    # Fingerprints are taken on the host, before the move: hashing device tensors would copy
    # the whole frozen backbone back (1.4 GB at base size).
    base_fingerprint = check_frozen_fingerprint(policy)
    if settings.train.frozen_dtype == "bf16" and policy.model.vlm_is_frozen():
        # Frozen weights in bf16 halve their memory; autocast keeps the math consistent.
        policy.model.vlm_with_expert.vlm.to(torch.bfloat16)
    local_frozen = frozen_fingerprint(policy)
    policy = policy.to(context.device)
    ddp, comm = wrap_ddp(policy, device=context.device)
    opt, sched = settings.train.optimizer, settings.train.scheduler
    optimizer = build_optimizer(
        ddp.module.params, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps,
        weight_decay=opt.weight_decay, fused=context.device.type == "cuda",
    )  # fmt: skip
    scheduler = build_scheduler(
        optimizer, kind=sched.type, warmup_steps=sched.warmup_steps,
        decay_steps=sched.decay_steps, decay_lr=sched.decay_lr, total_steps=settings.train.steps,
    )  # fmt: skip
    return _Worker(meta, policy, ddp, comm, optimizer, scheduler, base_fingerprint, local_frozen)


def _metrics_log(settings: RunSettings, options: Mapping[str, Any]) -> MetricsLog:
    observe = settings.observe
    return MetricsLog(
        settings.run_uri,
        options,
        tensorboard=observe.tensorboard,
        mlflow_tracking_uri=observe.mlflow_tracking_uri,
        mlflow_experiment=observe.mlflow_experiment,
        run_name=settings.name,
        params=settings.spec_json,
        wandb_project=observe.wandb_project,
        wandb_entity=observe.wandb_entity,
        wandb_run_name=observe.wandb_run_name,
        wandb_tags=observe.wandb_tags,
        wandb_mode=observe.wandb_mode,
    )


def _on_nonfinite(settings: RunSettings, state: TrainState, step: int) -> None:
    """Step `step`'s loss or gradient norm was not finite: its update was not applied."""
    if settings.on_nonfinite == "stop":
        raise RuntimeError(
            f"non-finite loss or gradient norm at step {step}; parameters were not updated "
            f"(noticed at step {state.step}, the first report after it). Set "
            "failure.on_nonfinite: skip to skip such steps, or lower train.optimizer.lr"
        )
    state.skipped_steps += 1


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this worker: CUDA allocations on GPU, the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _check_replicas(ddp, policy, local_frozen: dict[str, str]) -> None:
    """Fail when replicas drifted apart or a frozen tensor changed since the start."""
    digests = _gather(tensors_digest(ddp.module.params))
    if len(set(digests)) != 1:
        raise RuntimeError(f"trainable parameters differ across workers: digests {digests}")
    changed = [k for k, v in frozen_fingerprint(policy).items() if local_frozen.get(k) != v]
    if changed:
        raise RuntimeError(f"frozen parameters changed during training: {changed[:5]}")


def _gather(obj: Any) -> list[Any]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _broadcast(value: Any) -> Any:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
