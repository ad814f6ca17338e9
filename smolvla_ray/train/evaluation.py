"""Held-out evaluation inside training: which samples (`HeldOut`), what is measured
(`evaluate_batches` -> `EvalSums`), and the table each evaluation leaves in the run
directory (`write_table`). docs/evaluation.md says what and why; `smolvla_ray.evaluation`
runs the same code offline (`smolvla-ray evaluate`) and as Ray Train validation tasks.

What an evaluation measures, on the held-out samples, with every random draw fixed:

- `eval/loss`: the flow-matching loss, noise and time drawn per sample from a generator keyed
  by (seed, sample index) alone (train/step.py's, under a key no training step uses), the
  mean over valid (not padded) action elements, as the training loss;
- the error of a sampled action chunk (`predict_action_chunk`, its noise fixed the same way)
  against the recorded one, over valid elements: `eval/action_mse` and `eval/action_l1` in
  normalized units, `eval/action_mse_robot` and `eval/action_l1_robot` in the robot's units
  (both unnormalized with the dataset's statistics); and the same per action dimension and
  per horizon step in the full table.

Workers each evaluate their share (a fixed, evenly spaced subset of the held-out frames,
dealt round-robin) and add their sums into one all-reduce, so the result is the same as one
worker's up to float64 summation order; the same weights, samples and workers give the same
numbers, bit for bit.

A mixture (`data.datasets`) holds out each dataset's episodes and evaluates each dataset's
held-out samples apart (`evaluate_held_out`): conformed as in training, noise keyed by
(seed, dataset, sample index), errors over the dataset's own action dims, robot units with
its own statistics. Its summary is the overall metrics (every dataset's sums together) plus
each dataset's under `eval/<name>/...`; its table holds each dataset's.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from smolvla_ray.data.samples import collate_samples
from smolvla_ray.keys import ACTION, DATASET_INDEX
from smolvla_ray.run_layout import EVAL_DIR, eval_table_name
from smolvla_ray.storage import filesystem, join, with_retries
from smolvla_ray.train.step import flow_noise_and_time, to_device, valid_elements

# Keys of the per-sample generators (train/step.py's `step` argument): training steps are
# 0, 1, ...; these never collide with them.
LOSS_KEY, SAMPLING_KEY = -1, -2
SUMS = ("mse", "l1", "mse_robot", "l1_robot")
# An async evaluation's result names the checkpoint step it belongs to (evaluation/validation.py).
CHECKPOINT_STEP = "eval/checkpoint_step"


@dataclass
class EvalSums:
    """Additive totals of one evaluation: sums over samples, per (horizon step, dimension)."""

    loss_sum: Tensor  # () float64: sum over samples of per-sample loss x valid elements
    valid: Tensor  # () float64: valid action elements
    errors: Tensor  # (4, chunk, action_dim) float64: the SUMS, summed over samples
    counts: Tensor  # (chunk,) float64: samples whose horizon step is valid
    samples: int

    @classmethod
    def zeros(cls, chunk: int, action_dim: int, device: torch.device) -> EvalSums:
        f64 = {"dtype": torch.float64, "device": device}
        return cls(
            torch.zeros((), **f64), torch.zeros((), **f64),
            torch.zeros(len(SUMS), chunk, action_dim, **f64), torch.zeros(chunk, **f64), 0,
        )  # fmt: skip

    def all_reduce(self) -> None:
        """Sum every worker's totals in place (one collective)."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return
        flat = torch.cat(
            [
                self.loss_sum.reshape(1),
                self.valid.reshape(1),
                self.errors.flatten(),
                self.counts,
                torch.tensor([float(self.samples)], dtype=torch.float64, device=self.valid.device),
            ]
        )
        dist.all_reduce(flat)
        chunk, dim = self.counts.shape[0], self.errors.shape[-1]
        self.loss_sum, self.valid = flat[0], flat[1]
        self.errors = flat[2 : 2 + self.errors.numel()].reshape(len(SUMS), chunk, dim)
        self.counts = flat[2 + self.errors.numel() : -1]
        self.samples = int(flat[-1].item())

    def summary(self) -> dict[str, float]:
        """The `eval/...` scalars every sink gets."""
        elements = (self.counts.sum() * self.errors.shape[-1]).clamp_min(1)
        out = {"eval/loss": float(self.loss_sum / self.valid.clamp_min(1))}
        for name, total in zip(SUMS, self.errors, strict=True):
            out[f"eval/action_{name}"] = float(total.sum() / elements)
        out["eval/samples"] = float(self.samples)
        return out

    def table(self) -> dict[str, Any]:
        """The full table: per action dimension and per horizon step, each of the SUMS."""
        per_step = self.counts.clamp_min(1)[:, None]
        per_dim = self.counts.sum().clamp_min(1)
        return {
            "samples": self.samples,
            "per_dimension": {
                name: (total.sum(0) / per_dim).tolist()
                for name, total in zip(SUMS, self.errors, strict=True)
            },
            "per_horizon_step": {
                name: (total / per_step).mean(1).tolist()
                for name, total in zip(SUMS, self.errors, strict=True)
            },
            "valid_per_horizon_step": self.counts.tolist(),
        }


@torch.no_grad()
def evaluate_batches(
    policy: torch.nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    seed: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    action_dim: int | None = None,
    postprocess: Callable[[Tensor], Tensor] | None = None,
) -> EvalSums:
    """This worker's totals over `batches` (preprocessed, as the training loader yields
    them), with the policy in eval mode (inline, offline and async evaluations alike); it is
    put back in training mode afterwards if it was in it.

    A mixture dataset's batches pass its own `action_dim` (errors over those dims only) and
    its processor's `postprocess` (robot units by its statistics); by default the policy's."""
    config = policy.config
    processor = policy.processor
    if postprocess is None and processor is not None:
        postprocess = processor.postprocess
    dim = action_dim if action_dim is not None else config.action_dim
    was_training = policy.training
    sums = EvalSums.zeros(config.chunk_size, dim, device)
    policy.eval()
    try:
        for raw in batches:
            batch = to_device(dict(raw), device)
            indices = raw["index"].tolist()
            shape = {"chunk_size": config.chunk_size, "action_dim": config.max_action_dim}
            # A mixture's samples key their draws by dataset too, as in training.
            datasets = raw[DATASET_INDEX].tolist() if DATASET_INDEX in raw else None
            noise, time = flow_noise_and_time(
                indices, seed=seed, step=LOSS_KEY, datasets=datasets, **shape
            )
            sample_noise, _ = flow_noise_and_time(
                indices, seed=seed, step=SAMPLING_KEY, datasets=datasets, **shape
            )
            autocast = (
                torch.autocast(device.type, dtype=autocast_dtype)
                if autocast_dtype is not None
                else torch.autocast(device.type, enabled=False)
            )
            with autocast:
                per_sample = policy.per_sample_loss(batch, noise.to(device), time.to(device))
                predicted = policy.predict_action_chunk(batch, noise=sample_noise.to(device))
            weights = valid_elements(batch, config.action_dim)
            sums.loss_sum += (per_sample.double() * weights).sum()
            sums.valid += weights.sum()
            target = batch[ACTION][:, :, :dim].double()
            predicted = predicted[:, :, :dim].double()
            is_pad = batch.get("action_is_pad")
            mask = (
                (~is_pad.bool()).double()
                if is_pad is not None
                else torch.ones(target.shape[:2], dtype=torch.float64, device=device)
            )
            robot = (
                (postprocess(predicted), postprocess(target))
                if postprocess is not None
                else (predicted, target)
            )
            diff = predicted - target
            diff_robot = robot[0] - robot[1]
            weight = mask[:, :, None]
            for slot, value in enumerate(
                (diff.square(), diff.abs(), diff_robot.square(), diff_robot.abs())
            ):
                sums.errors[slot] += (value * weight).sum(0)
            sums.counts += mask.sum(0)
            sums.samples += len(indices)
    finally:
        policy.train(was_training)
    return sums


# ------------------------------------------------------------------- held-out samples


def evenly_spaced(count: int, max_samples: int | None) -> list[int]:
    """`max_samples` rows of `count`, evenly spaced from the first to the last (all rows
    when `max_samples` is None or not smaller)."""
    if max_samples is None or max_samples >= count:
        return list(range(count))
    if max_samples == 1:
        return [0]
    return [round(i * (count - 1) / (max_samples - 1)) for i in range(max_samples)]


@dataclass
class HeldOut:
    """A held-out dataset, the rows evaluated, and how this worker reads its share."""

    dataset: Dataset
    rows: list[int]
    batch_size: int
    num_workers: int = 0
    transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    action_dim: int | None = None
    """A mixture dataset's own action dims (None: the policy's)."""
    postprocess: Callable[[Tensor], Tensor] | None = None
    """A mixture dataset's normalized -> robot units (None: the policy's processor)."""

    def batches(self, *, rank: int = 0, world_size: int = 1) -> Iterator[dict[str, Any]]:
        """This worker's batches: rows rank, rank + world_size, ... in order."""
        mine: Sequence[int] = self.rows[rank::world_size]
        if not mine:
            return
        loader = DataLoader(
            Subset(self.dataset, list(mine)),
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=collate_samples,
            num_workers=self.num_workers,
        )
        for batch in loader:
            yield self.transform(batch) if self.transform is not None else batch


def evaluate_held_out(
    policy: torch.nn.Module,
    held_out: HeldOut | Mapping[str, HeldOut],
    *,
    rank: int,
    world_size: int,
    seed: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Every worker's evaluation of `held_out` together (a mixture's: one `HeldOut` per
    dataset, by name, one all-reduce each): the summary and the table."""
    parts = held_out if isinstance(held_out, Mapping) else {"": held_out}
    sums = {}
    for name, part in parts.items():
        sums[name] = evaluate_batches(
            policy, part.batches(rank=rank, world_size=world_size), seed=seed, device=device,
            autocast_dtype=autocast_dtype, action_dim=part.action_dim,
            postprocess=part.postprocess,
        )  # fmt: skip
        sums[name].all_reduce()
    if not isinstance(held_out, Mapping):
        return sums[""].summary(), sums[""].table()
    return mixture_summary(sums), {
        "samples": sum(s.samples for s in sums.values()),
        "datasets": {name: s.table() for name, s in sums.items()},
    }


def mixture_summary(sums: Mapping[str, EvalSums]) -> dict[str, float]:
    """A mixture's scalars: the overall ones over every dataset's sums together (the loss
    per valid element, the errors per valid (step, own dim) element, as for one dataset),
    then each dataset's own as `eval/<name>/...`."""
    valid = sum(s.valid for s in sums.values())
    elements = sum(s.counts.sum() * s.errors.shape[-1] for s in sums.values())
    out = {"eval/loss": float(sum(s.loss_sum for s in sums.values()) / valid.clamp_min(1))}
    for slot, name in enumerate(SUMS):
        total = sum(s.errors[slot].sum() for s in sums.values())
        out[f"eval/action_{name}"] = float(total / elements.clamp_min(1))
    out["eval/samples"] = float(sum(s.samples for s in sums.values()))
    for dataset, part in sums.items():
        for key, value in part.summary().items():
            out[f"eval/{dataset}/{key.removeprefix('eval/')}"] = value
    return out


# ---------------------------------------------------------------------------- tables


def write_table(
    run: str,
    storage_options: Mapping[str, Any],
    *,
    step: int,
    summary: Mapping[str, float],
    table: Mapping[str, Any],
    best: bool,
    weights: Literal["ema", "raw"] = "raw",
) -> str:
    """Write step `step`'s evaluation, which evaluated `weights` (the run's EMA or the raw
    trained weights); returns its path in the run's filesystem."""
    fs, root = filesystem(run, storage_options)
    path = join(root, EVAL_DIR, eval_table_name(step))
    record = {"step": step, "weights": weights, "summary": dict(summary), "best_so_far": best}
    payload = json.dumps({**record, **table}, indent=1).encode()

    def write() -> None:
        fs.makedirs(join(root, EVAL_DIR), exist_ok=True)
        fs.pipe_file(path, payload)

    with_retries(write, what=f"write of {path}")
    return path


def read_tables(run: str, storage_options: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every evaluation table of the run, by step ([] when there is none)."""
    fs, root = filesystem(run, storage_options)
    directory = join(root, EVAL_DIR)
    try:
        names = sorted(p for p in fs.ls(directory, detail=False) if p.endswith(".json"))
    except FileNotFoundError:
        return []
    return [json.loads(fs.cat_file(name)) for name in names]
