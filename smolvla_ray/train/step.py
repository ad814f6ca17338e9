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

And one keeps a GPU busy: nothing here waits for the device. The valid-element counts, the
loss, the gradient norm and the "finite" flag stay device tensors until the trainer's next
log step reads a whole window of them at once (`window.py`); phase times are CUDA events
there, read at the same moment. Skipping a non-finite step then cannot be a host `if`: on
CUDA the optimizer is the fused AdamW, which skips the update itself when its `found_inf`
tensor is set (as under torch's GradScaler); on CPU, where nothing runs asynchronously, the
host decides as before. Images arrive as uint8 (pinned, on CUDA) and become float32 in
[0, 1] on the device, bit-identical to the host conversion.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from smolvla_ray.keys import ACTION, ACTION_DIM_MASK, DATASET_INDEX


def _sample_seed(seed: int, step: int, index: int, dataset: int | None = None) -> int:
    # One dataset keeps the key it always had (runs resume exactly); a mixture's samples are
    # keyed by their dataset too, since two datasets share index values.
    key = f"{seed}:{step}:{index}" if dataset is None else f"{seed}:{step}:{dataset}:{index}"
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def flow_noise_and_time(
    indices: Sequence[int],
    *,
    seed: int,
    step: int,
    chunk_size: int,
    action_dim: int,
    datasets: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Noise (B, chunk_size, action_dim) and time (B,), a pure function of each sample:
    (seed, step, index), or for a mixture (seed, step, dataset position, index)."""
    noises, times = [], []
    for position, index in enumerate(indices):
        dataset = int(datasets[position]) if datasets is not None else None
        g = torch.Generator().manual_seed(_sample_seed(seed, step, int(index), dataset))
        noises.append(torch.randn(chunk_size, action_dim, generator=g))
        u = torch.rand((), generator=g)
        times.append(u ** (2.0 / 3.0) * 0.999 + 0.001)
    return torch.stack(noises), torch.stack(times).to(torch.float32)


def valid_elements(batch: dict, action_dim: int) -> Tensor:
    """Valid (not padded) action elements of each sample, (B,) float64, on the batch's device:
    its unpadded steps times its action dims (a mixture's sample: its own dims)."""
    is_pad = batch.get("action_is_pad")
    actions = batch[ACTION]
    chunk = actions.shape[1]
    dims = batch.get(ACTION_DIM_MASK)
    if dims is not None:
        steps = (
            chunk - is_pad.sum(dim=1)
            if is_pad is not None
            else torch.full_like(dims[:, 0], chunk, dtype=torch.int64)
        )
        return steps.to(torch.float64) * dims.bool().sum(dim=1).to(torch.float64)
    if is_pad is None:
        return torch.full((actions.shape[0],), chunk * action_dim, dtype=torch.float64,
                          device=actions.device)  # fmt: skip
    return (chunk - is_pad.sum(dim=1)).to(torch.float64) * action_dim


class PhaseClock:
    """Marks between the step's phases: CUDA events on a GPU (read later, without stalling
    the queue now), host clocks on a CPU (where the work is done when the call returns)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[object] = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        """The durations between consecutive marks (waits for the last CUDA event)."""
        if self.cuda:
            self.marks[-1].synchronize()  # type: ignore[attr-defined]
            return [
                a.elapsed_time(b) / 1000.0  # type: ignore[attr-defined]
                for a, b in zip(self.marks, self.marks[1:], strict=False)
            ]
        return [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]  # type: ignore[operator]


@dataclass
class StepResult:
    """What one optimizer step measured; the tensors stay on the device (see the module
    docstring) until `resolve` reads them."""

    loss: Tensor  # the global batch's mean loss, float64 scalar
    grad_norm: Tensor
    finite: Tensor  # bool scalar: loss and gradient norm finite, the update applied
    lr: float
    num_samples: int
    clock: PhaseClock
    micro_batches: int = 1  # the clock's marks: start, then (forward, backward) each, optimizer

    def resolve(self) -> ResolvedStep:
        """Host values (one device sync for the scalars, one for the timings)."""
        loss, grad_norm, finite = torch.stack(
            [self.loss.double(), self.grad_norm.double(), self.finite.double()]
        ).tolist()
        durations = self.clock.seconds()
        # marks: [start, (fwd_end, bwd_end) per micro-batch..., optimizer_end]
        forward = backward = 0.0
        for i in range(self.micro_batches):
            forward += durations[2 * i]
            backward += durations[2 * i + 1]
        return ResolvedStep(
            loss=loss,
            grad_norm=grad_norm,
            finite=bool(finite),
            lr=self.lr,
            num_samples=self.num_samples,
            forward_s=forward,
            backward_s=backward,
            optimizer_s=durations[-1],
        )


@dataclass
class ResolvedStep:
    """A step's measurements on the host."""

    loss: float
    grad_norm: float
    finite: bool
    lr: float
    num_samples: int
    forward_s: float
    backward_s: float
    optimizer_s: float


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch on `device`, uint8 images (and any other uint8 tensor) as float32 in [0, 1]
    scaled there: the same values as `.float() / 255` on the host, a quarter of the bytes."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, Tensor):
            value = value.to(device, non_blocking=True)
            if value.dtype == torch.uint8:
                value = value.float().div_(255.0)
        out[key] = value
    return out


def _pinned(tensor: Tensor, device: torch.device) -> Tensor:
    """Host tensors made here (noise, time) go to a GPU without waiting for its queue."""
    return tensor.pin_memory() if device.type == "cuda" else tensor


def uses_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` skips its own update on `found_inf` (torch's fused Adam/AdamW)."""
    return bool(optimizer.defaults.get("fused"))


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
) -> StepResult:
    """Forward/backward over `micro_batches` (gradients synced on the last), clip, update.

    A non-finite loss or gradient norm leaves the parameters and the optimizer's state
    untouched (`finite` false); the trainer learns it at its next log step and skips the
    step or stops the job as the spec says.
    """
    policy = ddp.module.policy
    config = policy.config
    world = dist.get_world_size() if dist.is_initialized() else 1
    clock = PhaseClock(device)
    # Counted on the host batches (CPU tensors: no device sync), so that each micro-batch
    # moves to the device only when its turn comes (one micro-batch's memory, not all).
    local_valid = sum(float(valid_elements(raw, config.action_dim).sum()) for raw in micro_batches)
    global_valid = torch.tensor([local_valid], dtype=torch.float64)
    global_valid = _pinned(global_valid, device).to(device, non_blocking=True)
    if world > 1:
        dist.all_reduce(global_valid)
    global_valid = global_valid.clamp(min=1.0)

    clock.mark()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for position, raw in enumerate(micro_batches):
        batch = to_device(raw, device)
        weight = valid_elements(batch, config.action_dim)
        noise, flow_time = flow_noise_and_time(
            raw["index"].tolist(),
            seed=seed,
            step=step,
            chunk_size=config.chunk_size,
            action_dim=config.max_action_dim,
            datasets=raw[DATASET_INDEX].tolist() if DATASET_INDEX in raw else None,
        )
        noise = _pinned(noise, device).to(device, non_blocking=True)
        flow_time = _pinned(flow_time, device).to(device, non_blocking=True)
        last = position == len(micro_batches) - 1
        with nullcontext() if last else ddp.no_sync():
            autocast = (
                torch.autocast(device.type, dtype=autocast_dtype)
                if autocast_dtype is not None
                else nullcontext()
            )
            with autocast:
                per_sample = ddp(batch, noise, flow_time)
            summed = (per_sample.float() * weight.to(per_sample.device).float()).sum()
            loss = summed * (world / global_valid[0]).float()
            clock.mark()
            loss.backward()
            clock.mark()
        loss_sum = loss_sum + summed.detach().double()

    params = list(ddp.module.params)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip_norm)
    total = loss_sum.reshape(1)
    if world > 1:
        dist.all_reduce(total)
    mean = total[0] / global_valid[0]
    finite = torch.isfinite(mean) & torch.isfinite(grad_norm)
    if uses_found_inf(optimizer):
        optimizer.found_inf = (~finite).float()  # type: ignore[attr-defined]
        optimizer.step()
    elif bool(finite):  # CPU: the host decides; no queue to stall
        optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    lr = optimizer.param_groups[0]["lr"]
    scheduler.step()
    clock.mark()
    return StepResult(
        loss=mean,
        grad_norm=grad_norm,
        finite=finite,
        lr=lr,
        num_samples=sum(int(raw[ACTION].shape[0]) for raw in micro_batches),
        clock=clock,
        micro_batches=len(micro_batches),
    )
