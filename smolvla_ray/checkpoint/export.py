"""Export: base weights + a checkpoint's trained tensors -> a LeRobot `pretrained_model/`.

The base is rebuilt from the identity the checkpoint recorded (a pretrained URI, or a preset
with the run's seed) and must hash to the recorded frozen fingerprint, so an export never
silently merges trained tensors into the wrong backbone.

The trained tensors are the checkpoint's EMA of the trainable weights when the run kept one
(`train.ema`), unless the raw weights are asked for; `TrainedPolicy.weights` says which.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from smolvla_ray.checkpoint.discovery import fetch_checkpoint
from smolvla_ray.checkpoint.format import load_mixture_stats, read_checkpoint
from smolvla_ray.features import FeatureResolution, dataset_resolution
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


class DatasetChoiceError(ValueError):
    """`--dataset` names no dataset of the checkpoint's mixture, or the run had one."""


@dataclass(frozen=True)
class TrainedPolicy:
    """A checkpoint's policy and which of its trained tensors it holds."""

    policy: SmolVLAPolicy
    weights: Literal["ema", "raw"]
    """`ema`: the run's EMA of the trainable weights; `raw`: the weights as trained."""
    dataset: str | None = None
    """For a mixture's checkpoint: the dataset whose statistics, camera keys and widths the
    policy carries; None for a run on one dataset."""


def policy_from_checkpoint(
    checkpoint_uri: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    raw_weights: bool = False,
    dataset: str | None = None,
) -> SmolVLAPolicy:
    """The trained policy a checkpoint describes (base + trained tensors + processor): its
    EMA weights when it has them and `raw_weights` is false; for a mixture, as `dataset`
    (default: the first) sees it."""
    return load_trained(
        checkpoint_uri, storage_options, raw_weights=raw_weights, dataset=dataset
    ).policy


def load_trained(
    checkpoint_uri: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    raw_weights: bool = False,
    dataset: str | None = None,
) -> TrainedPolicy:
    """`policy_from_checkpoint`, saying which weights it merged and, for a mixture, for
    which dataset (`dataset`, default the first): its statistics, its rename map, its
    cameras and widths. The weights are the same for every dataset (every camera and width
    shares them); only what the exported policy takes and returns differs."""
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
        use_ema = loaded.ema is not None and not raw_weights
        tensors = loaded.ema if use_ema and loaded.ema is not None else loaded.trainable
        trainable = policy.trainable_parameters()
        check_state_dict_keys(
            {k: v.detach() for k, v in trainable.items()}, tensors, source=checkpoint_uri
        )
        with torch.no_grad():
            for name, param in trainable.items():
                param.copy_(tensors[name])
        policy.processor = PolicyProcessor.load(config, local)
        name = _as_dataset(policy, state.features, local, dataset, checkpoint_uri)
    return TrainedPolicy(policy, "ema" if use_ema else "raw", name)


def mixture_datasets(features: Mapping[str, Any] | None) -> list[str]:
    """The mixture datasets a checkpoint's recorded features name, in order ([]: one)."""
    return list((features or {}).get("datasets") or {})


def _as_dataset(
    policy: SmolVLAPolicy,
    features: Mapping[str, Any] | None,
    local: Path,
    dataset: str | None,
    checkpoint_uri: str,
) -> str | None:
    """For a mixture's checkpoint, `policy` made `dataset`'s (default: the first): config
    features, processor and resolution. Returns the name (None for one dataset)."""
    names = mixture_datasets(features)
    if not names:
        if dataset is not None:
            raise DatasetChoiceError(
                f"--dataset {dataset!r}: checkpoint {checkpoint_uri} was trained on one "
                "dataset, not a mixture; leave --dataset out"
            )
        return None
    if dataset is not None and dataset not in names:
        raise DatasetChoiceError(
            f"--dataset {dataset!r}: checkpoint {checkpoint_uri} was trained on the mixture "
            f"{names}; pick one of them"
        )
    name = dataset or names[0]
    own = dataset_resolution(FeatureResolution.from_json(dict(features or {})), name)
    config = own.apply(policy.config)
    policy.config = config
    policy.processor = PolicyProcessor(config, load_mixture_stats(local, name), own.rename_map)
    policy.feature_resolution = own
    return name


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
    raw_weights: bool = False,
    merge: bool = False,
    dataset: str | None = None,
) -> TrainedPolicy:
    """Write the checkpoint's policy as a LeRobot `pretrained_model/` at `out`: its EMA
    weights when it has them and `raw_weights` is false (`weights` says which). A LoRA
    checkpoint (`policy.peft`) is written in LeRobot's adapter layout (`adapter_config.json`
    naming its base, `adapter_model.safetensors`, `config.json` with `use_peft: true`), or
    with `merge` as full weights with the adapters merged in. A mixture's checkpoint is
    written for `dataset` (default: the first; `TrainedPolicy.dataset` names it)."""
    problem = destination_problem(out, storage_options)
    if problem:
        raise ValueError(problem)
    trained = load_trained(
        checkpoint_uri, storage_options, raw_weights=raw_weights, dataset=dataset
    )
    if merge and has_adapters(trained.policy):
        merge_adapters(trained.policy)
    trained.policy.save_pretrained(out, **dict(storage_options or {}))
    return trained
