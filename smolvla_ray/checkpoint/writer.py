"""Rank 0's checkpoint writer: gathers what training changed into the checkpoint format and
hands it to Ray Train, which uploads it to the run's storage (asynchronously by default)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from ray.train import Checkpoint
from ray.train.v2.api.report_config import CheckpointUploadMode

from smolvla_ray.checkpoint.format import TrainingState, optimizer_tensors, write_checkpoint
from smolvla_ray.policy.modeling import SmolVLAPolicy
from smolvla_ray.spec import JobSpec


class CheckpointWriter:
    """Writes checkpoints of one run; knows the spec and the base weights' identity."""

    def __init__(self, *, spec: JobSpec, policy: SmolVLAPolicy, base_fingerprint: str) -> None:
        self.spec_json = spec.public_dict()  # without secrets; loads back into a JobSpec
        self.policy = policy
        self.base = {
            "uri": spec.policy.pretrained or f"preset:{spec.policy.preset}",
            "frozen_sha256": base_fingerprint,
        }
        mode = spec.checkpoint.upload_mode
        self.upload_mode = (
            CheckpointUploadMode.ASYNC if mode == "async" else CheckpointUploadMode.SYNC
        )

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
    ) -> Checkpoint:
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
        )
        directory.mkdir(parents=True, exist_ok=True)
        if self.policy.processor is not None:  # the dataset's stats, for export
            self.policy.processor.save(directory)
        write_checkpoint(
            directory,
            trainable=trainable,
            optimizer=optim_tensors,
            rng_states=rng_states,
            state=state,
        )
        return Checkpoint.from_directory(str(directory))
