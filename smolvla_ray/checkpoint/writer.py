"""Rank 0's checkpoint writer: gathers what training changed into the checkpoint format in a
local directory, and `upload_checkpoint`, which copies such a directory to storage: every file
retried through transient storage faults, the manifest last, so a checkpoint in storage is
never valid before all of it landed. (Handing it to Ray Train is the Ray adapter's job,
`train/loop.py`.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from smolvla_ray.checkpoint.base import base_identity
from smolvla_ray.checkpoint.format import (
    MANIFEST,
    TrainingState,
    optimizer_tensors,
    save_mixture_stats,
    write_checkpoint,
)
from smolvla_ray.settings import RunSettings
from smolvla_ray.storage import join, with_retries

if TYPE_CHECKING:
    from smolvla_ray.policy.modeling import SmolVLAPolicy


class CheckpointWriter:
    """Writes checkpoints of one run; knows its spec and the base weights' identity."""

    def __init__(
        self, *, settings: RunSettings, policy: SmolVLAPolicy, base_fingerprint: str
    ) -> None:
        self.spec_json = dict(settings.spec_json)  # without secrets; loads back into a JobSpec
        self.policy = policy
        self.base = {
            # uri, frozen fingerprint, the hub revision and its commit (None off the Hub)
            **base_identity(settings.policy, base_fingerprint),
            # Where a preset's VLM weights came from (None: random init, or inside `uri`).
            "vlm_weights": (
                policy.config.vlm_model_name
                if settings.policy.preset is not None and policy.config.load_vlm_weights
                else None
            ),
        }

    def write(
        self,
        directory: Path,
        *,
        step: int,
        epoch: int,
        cursors: list[dict[str, Any]],
        rng_states: list[torch.Tensor],
        ddp,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        counters: dict[str, Any],
        ema: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Write the checkpoint of this step into `directory` (created) and return it;
        `ema`: the EMA of the trainable parameters by name, when the run keeps one."""
        names: list[str] = ddp.module.names
        trainable = dict(zip(names, ddp.module.params, strict=True))
        optim_tensors, groups = optimizer_tensors(optimizer, names)
        scheduler_state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        state = TrainingState(
            step=step,
            epoch=epoch,
            cursors=cursors,
            param_names=names,
            param_groups=groups,
            scheduler=scheduler_state,
            spec=self.spec_json,
            policy_config=json.loads(self.policy.config.to_lerobot_json()),
            base=self.base,
            counters=dict(counters),
            features=(
                self.policy.feature_resolution.to_json()
                if self.policy.feature_resolution is not None
                else None
            ),
        )
        directory.mkdir(parents=True, exist_ok=True)
        if self.policy.processor is not None:  # the dataset's stats, for export
            self.policy.processor.save(directory)
        if self.policy.mixture_processors:  # every mixture dataset's, for export --dataset
            save_mixture_stats(directory, self.policy.mixture_processors)
        write_checkpoint(
            directory,
            trainable=trainable,
            optimizer=optim_tensors,
            rng_states=rng_states,
            state=state,
            ema=ema,
        )
        return directory


def upload_checkpoint(local: Path, fs, destination: str, *, best: bool = True) -> None:
    """Copy the checkpoint directory `local` to `destination` on the fsspec filesystem
    `fs`, each file retried through transient faults; the manifest goes last, so readers
    never see a complete-looking checkpoint that is not. Then, with `best`, the run's best
    checkpoints are updated (`checkpoint/best.py`: a no-op unless `checkpoint.keep_best`)."""
    files = sorted(p for p in local.iterdir() if p.is_file() and p.name != MANIFEST)
    if not (local / MANIFEST).exists():
        raise RuntimeError(f"checkpoint {local} has no {MANIFEST}; refusing to upload it")
    with_retries(lambda: fs.makedirs(destination, exist_ok=True), what=f"creating {destination}")
    for path in [*files, local / MANIFEST]:
        target = join(destination, path.name)
        with_retries(
            lambda path=path, target=target: fs.put_file(str(path), target),
            what=f"upload of {target}",
        )
    if best:
        # Imported here: best.py uploads its copies with this very function.
        from smolvla_ray.checkpoint.best import retain_best

        retain_best(local, fs, destination, lambda a, b, c: upload_checkpoint(a, b, c, best=False))
