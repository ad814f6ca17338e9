"""The per-worker training loop that Ray Train's TorchTrainer runs on every worker.

Build (policy with the freezing overrides, processor, data shard), check the frozen backbone
is the same everywhere, wrap the trainable view in DDP, then step; every `log_every` steps
all ranks report metrics (Ray requires every rank to call `report` equally often), and at
checkpoint steps rank 0 attaches a checkpoint of what training changed.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train.v2.api.report_config import CheckpointUploadMode

from smolvla_ray.checkpoint.base import base_identity, check_resume_base
from smolvla_ray.checkpoint.discovery import (
    checkpoint_dir_name,
    fetch_checkpoint,
    latest_valid_checkpoint,
)
from smolvla_ray.checkpoint.format import load_optimizer_state, read_checkpoint
from smolvla_ray.checkpoint.writer import CheckpointWriter, checkpoint_upload_fn
from smolvla_ray.spec import JobSpec
from smolvla_ray.train.ddp import check_frozen_fingerprint, frozen_fingerprint, wrap_ddp
from smolvla_ray.train.interrupt import Interrupts
from smolvla_ray.train.metrics import MetricsLog, run_uri
from smolvla_ray.train.optim import build_optimizer, build_scheduler
from smolvla_ray.train.setup import build_loader, build_policy, open_dataset
from smolvla_ray.train.step import train_step

log = logging.getLogger(__name__)
SYNC_UPLOAD = CheckpointUploadMode.SYNC  # an interrupt checkpoint must land before exiting


def say(message: str) -> None:
    """One progress line to the worker's stdout, which Ray forwards to the driver. Not
    `print`: Ray Train patches it into a logger *and* the stream, doubling every line."""
    sys.stdout.write(f"[smolvla-ray] {message}\n")
    sys.stdout.flush()


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this worker: CUDA allocations on GPU, the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _replica_digest(ddp) -> str:
    """A cheap digest of the trainable parameters, to compare replicas."""
    import hashlib

    h = hashlib.sha256()
    for p in ddp.module.params:
        h.update(p.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _gather(obj: Any) -> list[Any]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point; `loop_config` comes from `loop_config(spec)`."""
    spec = JobSpec.model_validate(loop_config["spec"])
    storage_options = ray.get(loop_config["storage_options_ref"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if spec.scaling.use_gpu else torch.device("cpu")

    meta = open_dataset(spec, storage_options=storage_options)
    policy = build_policy(spec, meta, storage_options=storage_options).to(device)
    policy.train()
    # Fingerprint the float32 base (export rebuilds it in float32 and compares).
    start_fingerprint = check_frozen_fingerprint(policy)
    if spec.resolved_frozen_dtype() == "bf16" and policy.model.vlm_is_frozen():
        # Frozen weights in bf16 halve their memory; autocast keeps the math consistent.
        policy.model.vlm_with_expert.vlm.to(torch.bfloat16)
    local_frozen = frozen_fingerprint(policy)

    ddp, comm = wrap_ddp(policy, device=device)
    names = ddp.module.names
    optimizer = build_optimizer(
        ddp.module.params,
        lr=spec.train.optimizer.lr,
        betas=tuple(spec.train.optimizer.betas),
        eps=spec.train.optimizer.eps,
        weight_decay=spec.train.optimizer.weight_decay,
    )
    scheduler = build_scheduler(
        optimizer,
        kind=spec.train.scheduler.type,
        warmup_steps=spec.train.scheduler.warmup_steps,
        decay_steps=spec.train.scheduler.decay_steps,
        decay_lr=spec.train.scheduler.decay_lr,
        total_steps=spec.train.steps,
    )

    step, cursor, counters = 0, None, {"skipped_steps": 0}
    resume_uri = _resume_source(spec, storage_options) if rank == 0 else None
    resume_uri = _broadcast(resume_uri)
    if resume_uri is not None:
        with tempfile.TemporaryDirectory(prefix="smolvla-resume-") as tmp:
            local = fetch_checkpoint(resume_uri, Path(tmp), storage_options)
            loaded = read_checkpoint(local)
        # Trained tensors are only meaningful on the backbone they were trained on.
        current = base_identity(spec, start_fingerprint)
        check_resume_base(loaded.state.base, current, checkpoint_uri=resume_uri)
        step, cursor, counters = _restore(loaded, ddp, optimizer, scheduler, rank, names)
        counters["resumed_from_step"] = step
        if rank == 0:
            say(f"resuming at step {step} from {resume_uri}")

    loader = build_loader(
        spec,
        meta,
        policy,
        rank=rank,
        world_size=world,
        cursor=cursor,
        storage_options=storage_options,
        feature_cache=loop_config.get("feature_cache"),
    )
    writer = CheckpointWriter(spec=spec, policy=policy, base_fingerprint=start_fingerprint)
    upload_fn = checkpoint_upload_fn(spec.checkpoint.storage, storage_options)
    interrupts = Interrupts(device=device)  # SIGTERM / Ray preemption notice -> checkpoint
    if rank == 0:
        counts = {"trainable": sum(p.numel() for p in ddp.module.params)}
        counts["total"] = sum(p.numel() for p in policy.parameters())
        say(
            f"{world} worker(s) on {device.type}; parameters: {counts['total']:,} "
            f"total, {counts['trainable']:,} trainable, "
            f"{counts['total'] - counts['trainable']:,} frozen"
        )

    metrics_log = (
        MetricsLog(
            run_uri(spec.checkpoint.storage, spec.name),
            storage_options,
            tensorboard=spec.observe.tensorboard,
            mlflow_tracking_uri=spec.observe.mlflow_tracking_uri,
            mlflow_experiment=spec.observe.mlflow_experiment,
            run_name=spec.name,
            params=spec.public_dict(),
        )
        if rank == 0
        else None
    )
    batches = iter(loader)
    autocast_dtype = torch.bfloat16 if spec.resolved_precision() == "bf16" else None
    every = spec.checkpoint.every_steps
    window_start, window_samples, window = time.perf_counter(), 0, []
    run_start = time.perf_counter()
    last_report_s = 0.0
    start_step = step
    while step < spec.train.steps:
        wait_start = time.perf_counter()
        micro = [next(batches) for _ in range(spec.train.grad_accum_steps)]
        data_wait = time.perf_counter() - wait_start
        result = train_step(
            ddp,
            micro,
            optimizer=optimizer,
            scheduler=scheduler,
            step=step,
            seed=spec.train.seed,
            grad_clip_norm=spec.train.optimizer.grad_clip_norm,
            device=device,
            autocast_dtype=autocast_dtype,
            augment=spec.data.augment,
        )
        step += 1
        if not result.finite:
            if spec.failure.on_nonfinite == "stop":
                raise RuntimeError(
                    f"non-finite loss {result.loss} or gradient norm {result.grad_norm} at "
                    f"step {step}; parameters were not updated. Set failure.on_nonfinite: skip "
                    "to skip such steps, or lower train.optimizer.lr"
                )
            counters["skipped_steps"] += 1
        window_samples += result.num_samples * world
        window.append((result, data_wait))
        comm_bytes = comm.take()

        check = spec.train.check_replicas_every
        if check and (step % check == 0 or step == spec.train.steps):
            _check_replicas(ddp, policy, local_frozen)
        checkpoint_s = 0.0
        is_last = step == spec.train.steps
        interrupt = interrupts.poll()  # agreed by all ranks
        do_checkpoint = is_last or interrupt.checkpoint or (every and step % every == 0)
        # Ray's report is a barrier across workers (about a second on a small machine), so
        # it runs at log_every and checkpoint steps only.
        if not (do_checkpoint or step % spec.train.log_every == 0):
            continue
        elapsed = time.perf_counter() - window_start

        def mean(values: list[float]) -> float:
            return sum(values) / len(values)

        # Means over the steps since the last report; grad norm and lr of this step.
        metrics = {
            "step": step,
            "epoch": loader.epoch,
            "loss": mean([r.loss for r, _ in window]),
            "grad_norm": result.grad_norm,
            "lr": result.lr,
            "samples_per_s": window_samples / elapsed if elapsed > 0 else 0.0,
            "step_s": elapsed / len(window),
            "data_wait_s": mean([w for _, w in window]),
            "forward_s": mean([r.forward_s for r, _ in window]),
            "backward_s": mean([r.backward_s for r, _ in window]),
            "optimizer_s": mean([r.optimizer_s for r, _ in window]),
            "comm_bytes": comm_bytes,
            "skipped_steps": counters["skipped_steps"],
            "resumed_from_step": counters.get("resumed_from_step", 0),
            "frozen_fingerprint": start_fingerprint,
        }
        cursors = _gather(loader.cursor())
        rngs = _gather(torch.get_rng_state())
        checkpoint = None
        if do_checkpoint:
            start = time.perf_counter()
            if rank == 0:
                checkpoint = writer.write(
                    Path(tempfile.mkdtemp(prefix="smolvla-ckpt-")),
                    step=step,
                    epoch=loader.epoch,
                    cursors=cursors,
                    rng_states=rngs,
                    ddp=ddp,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    counters=counters,
                )
            checkpoint_s = time.perf_counter() - start
        metrics["checkpoint_s"] = checkpoint_s
        # The previous report's duration: with a checkpoint and sync upload it includes the
        # upload; this is the time training was blocked beyond the local write.
        metrics["report_s"] = last_report_s
        metrics["peak_memory_mb"] = peak_memory_mb(device)
        if metrics_log is not None:
            metrics_log.append(metrics)
        if rank == 0:
            done = step - start_step
            eta = (time.perf_counter() - run_start) / max(done, 1) * (spec.train.steps - step)
            say(
                f"step {step}/{spec.train.steps} loss {metrics['loss']:.4f} "
                f"lr {result.lr:.2e} {metrics['samples_per_s']:.1f} samples/s "
                f"eta {eta:.0f}s" + (" (checkpoint)" if checkpoint is not None else "")
            )
        report_start = time.perf_counter()
        ray.train.report(
            metrics,
            checkpoint=checkpoint,
            checkpoint_dir_name=checkpoint_dir_name(step) if do_checkpoint else None,
            checkpoint_upload_mode=SYNC_UPLOAD if interrupt.exit else writer.upload_mode,
            checkpoint_upload_fn=upload_fn,
            delete_local_checkpoint_after_upload=checkpoint is not None,
        )
        if interrupt.exit and not is_last:
            interrupts.exit_after_checkpoint(step=step, checkpoint_dir=checkpoint_dir_name(step))
        last_report_s = time.perf_counter() - report_start
        window_start, window_samples, window = time.perf_counter(), 0, []
    if metrics_log is not None:
        metrics_log.close()


def _resume_source(spec: JobSpec, storage_options: dict[str, Any]) -> str | None:
    """The newest verified checkpoint of this run, else `checkpoint.from_checkpoint`."""
    info = latest_valid_checkpoint(run_uri(spec.checkpoint.storage, spec.name), storage_options)
    if info is not None:
        return info.uri
    return spec.checkpoint.from_checkpoint


def _broadcast(value: Any) -> Any:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _check_replicas(ddp, policy, local_frozen: dict[str, str]) -> None:
    """Fail when replicas drifted apart or a frozen tensor changed since the start."""
    digests = _gather(_replica_digest(ddp))
    if len(set(digests)) != 1:
        raise RuntimeError(f"trainable parameters differ across workers: digests {digests}")
    changed = [k for k, v in frozen_fingerprint(policy).items() if local_frozen.get(k) != v]
    if changed:
        raise RuntimeError(f"frozen parameters changed during training: {changed[:5]}")


def _restore(loaded, ddp, optimizer, scheduler, rank: int, names: list[str]):
    """Load trainable tensors, optimizer, scheduler and RNG; return (step, cursor, counters)."""
    state = loaded.state
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
    if rank < len(loaded.rng_states):
        torch.set_rng_state(loaded.rng_states[rank])
    cursor = state.cursors[rank] if rank < len(state.cursors) else state.cursors[0]
    return state.step, cursor, dict(state.counters) or {"skipped_steps": 0}


def loop_config(spec: JobSpec, *, feature_cache: str | None = None) -> dict[str, Any]:
    """The train_loop_config for `spec`: the spec without secrets (Ray records this config
    in its run state) and a reference to the storage options in Ray's object store, which
    workers read from memory."""
    return {
        "spec": spec.public_dict(),
        "storage_options_ref": ray.put(spec.storage_options_plain()),
        "feature_cache": feature_cache,
    }
