"""Building the two things a run is made of, from a job spec: the policy (its overrides and
the dataset's resolved features, with a processor for the dataset) and the dataset's
metadata. Neutral ground: the trainer and the feature-cache build both use it, and it
imports neither.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from smolvla_ray.data.meta import DatasetMeta, load_meta, select_episodes
from smolvla_ray.data.split import split_by_task
from smolvla_ray.features import FeatureResolution, read_pretrained_config, resolve_spec
from smolvla_ray.policy.config import PolicyConfig
from smolvla_ray.spec import JobSpec

if TYPE_CHECKING:
    from smolvla_ray.policy.modeling import SmolVLAPolicy


def resolve_dataset_features(
    spec: JobSpec, meta: DatasetMeta, *, storage_options: Mapping[str, Any]
) -> tuple[PolicyConfig, FeatureResolution]:
    """The policy config to build and how the dataset's features feed it (the same answer
    the driver's preflight gave, from the same two JSON files)."""
    text = None
    if spec.policy.pretrained:
        text = read_pretrained_config(
            spec.policy.pretrained, storage_options, revision=spec.policy.revision
        )
    return resolve_spec(spec, text, meta.features)


def build_policy(
    spec: JobSpec, meta: DatasetMeta, *, storage_options: Mapping[str, Any]
) -> SmolVLAPolicy:
    """The policy with the spec's overrides and the dataset's resolved features, with a
    processor that renames the dataset's keys and normalizes with its statistics."""
    # Imported here: the driver uses this module's light helpers before Ray starts, and
    # the model's imports (torch, transformers) would cost it seconds on every run.
    import torch

    from smolvla_ray.policy.modeling import SmolVLAPolicy
    from smolvla_ray.policy.processor import PolicyProcessor

    config, resolution = resolve_dataset_features(spec, meta, storage_options=storage_options)
    if spec.policy.pretrained:
        policy = SmolVLAPolicy.from_pretrained(
            spec.policy.pretrained,
            prefix_mode=spec.policy.prefix_mode,
            config_overrides=config.model_dump(),
            revision=spec.policy.revision,
            **storage_options,
        )
    else:
        # Every worker seeds the same way, so random-init backbones agree (and are checked).
        torch.manual_seed(spec.train.seed)
        policy = SmolVLAPolicy(config, prefix_mode=spec.policy.prefix_mode)
    if spec.policy.peft is not None:
        add_lora(policy, spec)
    policy.processor = PolicyProcessor(policy.config, meta.stats, resolution.rename_map)
    policy.feature_resolution = resolution
    return policy


def lora_settings(spec: JobSpec):  # -> policy.adapters.LoraSettings | None
    """The spec's `policy.peft` as the policy's adapter settings (None without adapters)."""
    if spec.policy.peft is None:
        return None
    from smolvla_ray.policy.adapters import settings_from_options

    return settings_from_options(spec.policy.peft.model_dump())


def add_lora(policy: SmolVLAPolicy, spec: JobSpec) -> None:
    """`spec`'s LoRA adapters on `policy` (the whole base frozen), initialized from the run's
    seed so every worker and every rebuild starts from the same adapters; the adapters'
    base, for saving them, is the run's pretrained policy at its pinned commit."""
    from smolvla_ray import hub
    from smolvla_ray.policy.adapters import add_adapters

    settings = lora_settings(spec)
    if settings is None or spec.policy.pretrained is None:
        raise RuntimeError("add_lora needs policy.peft and policy.pretrained (the spec checks)")
    add_adapters(policy, settings, seed=spec.train.seed)
    commit = hub.model_commit(spec.policy.pretrained, spec.policy.revision)
    policy.adapter_base = (spec.policy.pretrained, commit or spec.policy.revision)


def episode_selection(spec: JobSpec) -> list[int] | range | None:
    episodes = spec.data.episodes
    if episodes is None or isinstance(episodes, list):
        return episodes
    return range(episodes.start, episodes.stop)


def _selected(spec: JobSpec, meta: DatasetMeta) -> list[int]:
    """`data.episodes` checked against the dataset (all episodes when unset)."""
    return select_episodes(meta, episode_selection(spec))  # positions are episode indices


def eval_episodes(spec: JobSpec, meta: DatasetMeta) -> list[int]:
    """The held-out episodes, in order ([] without an eval section): `eval.episodes`, which
    must lie within `data.episodes`, else LeRobot's per-task split of the selection."""
    if spec.eval is None:
        return []
    selected = _selected(spec, meta)
    explicit = spec.eval.episodes
    if explicit is None:
        return split_by_task(meta, selected, spec.eval.split)
    try:
        chosen = select_episodes(
            meta, explicit if isinstance(explicit, list) else range(explicit.start, explicit.stop)
        )
    except ValueError as err:
        raise ValueError(f"eval.episodes: {err}") from None
    outside = sorted(set(chosen) - set(selected))
    if outside:
        raise ValueError(f"eval.episodes {outside} are not among data.episodes")
    return chosen


def run_episodes(spec: JobSpec, meta: DatasetMeta) -> list[int]:
    """The episode indices the run trains on, in order: the selection minus the held-out
    episodes. One answer for the loader and the checks, so a held-out frame never reaches a
    training batch."""
    held = set(eval_episodes(spec, meta))
    train = [e for e in _selected(spec, meta) if e not in held]
    if not train:
        raise ValueError(
            f"the eval section holds out every selected episode ({len(held)}); lower "
            "eval.split, list fewer eval.episodes, or select more data.episodes"
        )
    return train


def cached_episodes(spec: JobSpec, meta: DatasetMeta) -> list[int]:
    """The episodes whose vision features the feature cache holds: training and held-out,
    in episode order (evaluations read the cache too). One answer for the cache's build,
    sizing and node copy, so they never disagree on which shards a run reads."""
    return sorted(run_episodes(spec, meta) + eval_episodes(spec, meta))


def open_dataset(spec: JobSpec, *, storage_options: Mapping[str, Any]) -> DatasetMeta:
    """The dataset's metadata; a hub id is read from this node's Hugging Face cache when it
    holds the snapshot, else from the Hub at the pinned revision."""
    from smolvla_ray import hub

    url = hub.dataset_url(spec.data.uri, spec.data.revision)
    return load_meta(url, storage_options=storage_options)
