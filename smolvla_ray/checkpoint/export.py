"""Export: base weights + a checkpoint's trained tensors -> a LeRobot `pretrained_model/`.

The base is rebuilt from the identity the checkpoint recorded (a pretrained URI, or a preset
with the run's seed) and must hash to the recorded frozen fingerprint, so an export never
silently merges trained tensors into the wrong backbone.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from smolvla_ray.checkpoint.discovery import fetch_checkpoint
from smolvla_ray.checkpoint.format import read_checkpoint
from smolvla_ray.policy.adapters import (
    add_adapters,
    has_adapters,
    merge_adapters,
    settings_from_options,
)
from smolvla_ray.policy.config import PolicyConfig
from smolvla_ray.policy.fingerprint import frozen_sha256
from smolvla_ray.policy.modeling import SmolVLAPolicy
from smolvla_ray.policy.pretrained import check_state_dict_keys
from smolvla_ray.policy.processor import PolicyProcessor
from smolvla_ray.run_layout import checkpoint_step
from smolvla_ray.storage import absolute, filesystem


def policy_from_checkpoint(
    checkpoint_uri: str, storage_options: Mapping[str, Any] | None = None
) -> SmolVLAPolicy:
    """The trained policy a checkpoint describes (base + trained tensors + processor)."""
    options = dict(storage_options or {})
    with tempfile.TemporaryDirectory(prefix="smolvla-export-") as tmp:
        local = fetch_checkpoint(checkpoint_uri, Path(tmp), options)
        loaded = read_checkpoint(local)
        state = loaded.state
        config = PolicyConfig.model_validate(state.policy_config)
        base_uri = state.base["uri"]
        if base_uri.startswith("preset:"):
            # The same seed, and with load_vlm_weights the same VLM source (the config
            # records vlm_model_name), rebuild the very base the run started from.
            torch.manual_seed(int(state.spec["train"]["seed"]))
            policy = SmolVLAPolicy(config)
        else:
            updates = config.model_dump()
            # The hub commit the run pinned (older checkpoints: the default branch).
            revision = state.base.get("commit") or state.base.get("revision")
            policy = SmolVLAPolicy.from_pretrained(
                base_uri, config_overrides=updates, revision=revision, **options
            )
        peft = (state.spec.get("policy") or {}).get("peft")
        if peft is not None:
            # The run's adapters on the base (their values come from the checkpoint), named
            # by the same state-dict names, so the frozen fingerprint compares as trained.
            add_adapters(policy, settings_from_options(peft))
            policy.adapter_base = (base_uri, state.base.get("commit") or state.base.get("revision"))
        fingerprint = frozen_sha256(policy)
        if fingerprint != state.base["frozen_sha256"]:
            vlm_weights = state.base.get("vlm_weights")  # absent in older checkpoints
            from_vlm = f" (VLM weights from {vlm_weights})" if vlm_weights else ""
            raise ValueError(
                f"the base weights at {base_uri}{from_vlm} do not match the ones checkpoint "
                f"{checkpoint_uri} was trained on (frozen fingerprint {fingerprint[:12]} vs "
                f"{state.base['frozen_sha256'][:12]}); export needs the same base checkpoint"
            )
        trainable = policy.trainable_parameters()
        check_state_dict_keys(
            {k: v.detach() for k, v in trainable.items()}, loaded.trainable, source=checkpoint_uri
        )
        with torch.no_grad():
            for name, param in trainable.items():
                param.copy_(loaded.trainable[name])
        policy.processor = PolicyProcessor.load(config, local)
    return policy


def destination_problem(out: str, storage_options: Mapping[str, Any] | None = None) -> str | None:
    """Why `out` cannot receive an export, or None: a file, or a place inside a checkpoint
    (whose manifest would no longer verify)."""
    fs, path = filesystem(absolute(out), storage_options)
    parts = path.rstrip("/").split("/")
    inside = next((p for p in parts if checkpoint_step(p) is not None), None)
    if inside:
        return (
            f"{out} is inside the checkpoint {inside}; export to a directory of its own, "
            "e.g. ./pretrained_model"
        )
    if fs.isfile(path):
        return f"{out} is a file; give a directory to write the pretrained_model/ to"
    return None


def export_checkpoint(
    checkpoint_uri: str,
    out: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    merge: bool = False,
) -> SmolVLAPolicy:
    """Write the checkpoint's policy as a LeRobot `pretrained_model/` at `out`. A LoRA
    checkpoint (`policy.peft`) is written in LeRobot's adapter layout (`adapter_config.json`
    naming its base, `adapter_model.safetensors`, `config.json` with `use_peft: true`), or
    with `merge` as full weights with the adapters merged in."""
    problem = destination_problem(out, storage_options)
    if problem:
        raise ValueError(problem)
    policy = policy_from_checkpoint(checkpoint_uri, storage_options)
    if merge and has_adapters(policy):
        merge_adapters(policy)
    policy.save_pretrained(out, **dict(storage_options or {}))
    return policy
