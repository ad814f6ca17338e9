"""AdamW and LeRobot's cosine-decay-with-warmup schedule, over trainable parameters only."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR


def build_optimizer(
    params: Iterable[torch.nn.Parameter],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    fused: bool = False,
) -> torch.optim.AdamW:
    """AdamW as LeRobot's SmolVLA preset builds it (one parameter group). `fused` (the
    trainer's choice on CUDA) is torch's fused kernel: the same update up to rounding, and it
    skips itself when told the step was not finite, with no host sync (train/step.py)."""
    return torch.optim.AdamW(
        list(params), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused or None
    )


def resolve_schedule(warmup_steps: int, decay_steps: int, total_steps: int) -> tuple[int, int]:
    """LeRobot rescales warmup and decay proportionally when the run is shorter than decay."""
    if total_steps < decay_steps:
        return int(warmup_steps * total_steps / decay_steps), total_steps
    return warmup_steps, decay_steps


def cosine_with_warmup(
    step: int, *, warmup_steps: int, decay_steps: int, peak_lr: float, decay_lr: float
) -> float:
    """LeRobot's `CosineDecayWithWarmupSchedulerConfig` multiplier at `step`."""
    if step < warmup_steps:
        if step <= 0:
            return 1 / (warmup_steps + 1)
        frac = 1 - step / warmup_steps
        return (1 / (warmup_steps + 1) - 1) * frac + 1
    clipped = min(step, decay_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * clipped / decay_steps))
    alpha = decay_lr / peak_lr
    return (1 - alpha) * cosine + alpha


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    kind: str,
    warmup_steps: int,
    decay_steps: int,
    decay_lr: float,
    total_steps: int,
) -> LambdaLR:
    """The LR schedule as a LambdaLR (its state is one integer, easy to checkpoint)."""
    if kind == "constant":
        return LambdaLR(optimizer, lambda _: 1.0)
    if kind != "cosine_decay_with_warmup":
        raise ValueError(f"scheduler type {kind!r} is not supported")
    warmup, decay = resolve_schedule(warmup_steps, decay_steps, total_steps)
    peak = optimizer.param_groups[0]["lr"]
    return LambdaLR(
        optimizer,
        lambda step: cosine_with_warmup(
            step, warmup_steps=warmup, decay_steps=decay, peak_lr=peak, decay_lr=decay_lr
        ),
    )
