"""One optimizer step: micro-batches with `no_sync`, a loss normalized over the global batch,
clipping, the optimizer and scheduler, and the step's time split.

Two choices make data-parallel training equal to one big batch (the equivalence test):

- Flow-matching noise and time are drawn per *sample*, from a generator keyed by
  (seed, step, dataset index), not from each worker's RNG stream. The distribution is
  LeRobot's (`time = Beta(1.5, 1) * 0.999 + 0.001`, drawn by inverse CDF `u ** (2/3)`), and
  resume needs no RNG state for it.
- The loss is the mean over the valid (not padded) elements of the *global* batch (all
  micro-batches on all workers): each worker scales its sum by `world / global_valid`, and
  DDP's gradient average then yields exactly the global mean's gradient.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from smolvla_ray.data.augment import AugmentSettings, augment_batch
from smolvla_ray.keys import ACTION


def _sample_seed(seed: int, step: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{step}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def flow_noise_and_time(
    indices: Sequence[int], *, seed: int, step: int, chunk_size: int, action_dim: int
) -> tuple[Tensor, Tensor]:
    """Noise (B, chunk_size, action_dim) and time (B,), a pure function of each sample."""
    noises, times = [], []
    for index in indices:
        g = torch.Generator().manual_seed(_sample_seed(seed, step, int(index)))
        noises.append(torch.randn(chunk_size, action_dim, generator=g))
        u = torch.rand((), generator=g)
        times.append(u ** (2.0 / 3.0) * 0.999 + 0.001)
    return torch.stack(noises), torch.stack(times).to(torch.float32)


def valid_elements(batch: dict, action_dim: int) -> Tensor:
    """Valid (not padded) action elements of each sample, (B,) float."""
    is_pad = batch.get("action_is_pad")
    chunk = batch[ACTION].shape[1]
    steps = (
        chunk - is_pad.sum(dim=1)
        if is_pad is not None
        else torch.full((batch[ACTION].shape[0],), chunk)
    )
    return steps.to(torch.float64) * action_dim


@dataclass
class StepResult:
    """What one optimizer step measured."""

    loss: float
    grad_norm: float
    lr: float
    num_samples: int
    forward_s: float
    backward_s: float
    optimizer_s: float
    finite: bool


def to_device(batch: dict, device: torch.device) -> dict:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()
    }


def train_step(
    ddp: DistributedDataParallel,
    micro_batches: list[dict],
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    step: int,
    seed: int,
    grad_clip_norm: float,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    augment: AugmentSettings | None = None,
) -> StepResult:
    """Forward/backward over `micro_batches` (gradients synced on the last), clip, update.

    A non-finite loss or gradient norm leaves the parameters untouched (`finite=False`);
    the caller skips the step or stops the job as the spec says.
    """
    policy = ddp.module.policy
    config = policy.config
    world = dist.get_world_size() if dist.is_initialized() else 1
    local_valid = sum(valid_elements(b, config.action_dim).sum() for b in micro_batches)
    total = torch.tensor([float(local_valid)], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(total)
    global_valid = max(total.item(), 1.0)

    forward_s = backward_s = 0.0
    loss_sum = 0.0
    for position, raw in enumerate(micro_batches):
        if augment is not None and augment.enable:
            cameras = list(config.image_features)
            raw = augment_batch(raw, cameras, augment, seed=seed, step=step)
        batch = to_device(raw, device)
        noise, flow_time = flow_noise_and_time(
            raw["index"].tolist(),
            seed=seed,
            step=step,
            chunk_size=config.chunk_size,
            action_dim=config.max_action_dim,
        )
        last = position == len(micro_batches) - 1
        sync = nullcontext() if last else ddp.no_sync()
        with sync:
            start = time.perf_counter()
            autocast = (
                torch.autocast(device.type, dtype=autocast_dtype)
                if autocast_dtype is not None
                else nullcontext()
            )
            with autocast:
                per_sample = ddp(batch, noise.to(device), flow_time.to(device))
            weights = valid_elements(batch, config.action_dim).to(per_sample.device)
            summed = (per_sample.float() * weights.float()).sum()
            loss = summed * (world / global_valid)
            mid = time.perf_counter()
            loss.backward()
            end = time.perf_counter()
        forward_s += mid - start
        backward_s += end - mid
        loss_sum += summed.item()

    start = time.perf_counter()
    params = list(ddp.module.params)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip_norm)
    mean_loss = torch.tensor([loss_sum], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(mean_loss)
    mean = mean_loss.item() / global_valid
    finite = math.isfinite(mean) and bool(torch.isfinite(grad_norm))
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    lr = optimizer.param_groups[0]["lr"]
    scheduler.step()
    optimizer_s = time.perf_counter() - start
    return StepResult(
        loss=mean,
        grad_norm=float(grad_norm),
        lr=lr,
        num_samples=sum(b[ACTION].shape[0] for b in micro_batches),
        forward_s=forward_s,
        backward_s=backward_s,
        optimizer_s=optimizer_s,
        finite=finite,
    )
