"""What a worker builds before step 1: the policy with the spec's overrides, its processor
from the dataset's statistics, and this worker's shard of the data."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from smolvla_ray.cache.store import CachedFeatures, CacheStore
from smolvla_ray.data.loader import ShardedLoader
from smolvla_ray.data.meta import DatasetMeta, load_meta
from smolvla_ray.data.samples import FrameDataset
from smolvla_ray.data.storage import DEFAULT_CACHE_DIR, FileCache
from smolvla_ray.features import FeatureResolution, read_pretrained_config, resolve_spec
from smolvla_ray.policy.config import PolicyConfig
from smolvla_ray.policy.modeling import SmolVLAPolicy
from smolvla_ray.policy.pretrained import load_pretrained
from smolvla_ray.policy.processor import PolicyProcessor
from smolvla_ray.spec import JobSpec


def resolve_dataset_features(
    spec: JobSpec, meta: DatasetMeta, *, storage_options: Mapping[str, Any]
) -> tuple[PolicyConfig, FeatureResolution]:
    """The policy config to build and how the dataset's features feed it (the same answer
    the driver's preflight gave, from the same two JSON files)."""
    text = None
    if spec.policy.pretrained:
        text = read_pretrained_config(
            spec.policy.pretrained, storage_options, revision=_revision(spec)
        )
    return resolve_spec(spec, text, meta.features)


def _revision(spec: JobSpec) -> str | None:
    return getattr(spec.policy, "revision", None)


def build_policy(
    spec: JobSpec, meta: DatasetMeta, *, storage_options: Mapping[str, Any]
) -> SmolVLAPolicy:
    """The policy with the spec's overrides and the dataset's resolved features, with a
    processor that renames the dataset's keys and normalizes with its statistics."""
    config, resolution = resolve_dataset_features(spec, meta, storage_options=storage_options)
    if spec.policy.pretrained:
        policy = load_pretrained(
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
    policy.processor = PolicyProcessor(policy.config, meta.stats, resolution.rename_map)
    policy.feature_resolution = resolution
    return policy


def episode_selection(spec: JobSpec) -> list[int] | range | None:
    episodes = spec.data.episodes
    if episodes is None or isinstance(episodes, list):
        return episodes
    return range(episodes.start, episodes.stop)


def open_dataset(spec: JobSpec, *, storage_options: Mapping[str, Any]) -> DatasetMeta:
    """The dataset's metadata; a hub id is read from this node's Hugging Face cache when it
    holds the snapshot, else from the Hub at the pinned revision."""
    from smolvla_ray import hub

    url = hub.dataset_url(spec.data.uri, spec.data.revision)
    return load_meta(url, storage_options=storage_options)


def build_loader(
    spec: JobSpec,
    meta: DatasetMeta,
    policy: SmolVLAPolicy,
    *,
    rank: int,
    world_size: int,
    cursor: dict[str, Any] | None,
    storage_options: Mapping[str, Any],
    feature_cache: str | None = None,
) -> ShardedLoader:
    """This worker's share of each epoch, preprocessed by the policy's processor. With a
    feature cache the samples carry cached vision features and no video is decoded."""
    cache_dir = Path(spec.data.cache_dir) if spec.data.cache_dir else DEFAULT_CACHE_DIR
    cache = FileCache(directory=cache_dir / "files", max_bytes=spec.data.cache_max_bytes)
    sources = policy.feature_resolution.sources  # policy camera key -> dataset camera key
    dataset: Dataset = FrameDataset(
        meta,
        episodes=episode_selection(spec),
        cameras=[] if feature_cache else list(sources.values()),
        chunk_size=policy.config.chunk_size,
        storage_options=storage_options,
        cache=cache,
    )
    if feature_cache:
        episodes = sorted({int(e) for e in dataset.frames.episode_index})
        local = cache_dir / "features" / feature_cache.rstrip("/").rsplit("/", 1)[-1]
        CacheStore(feature_cache, storage_options).fetch(episodes, local)
        dataset = CachedFeatures(dataset, local, list(sources))  # stored by policy key
    processor = policy.processor
    return ShardedLoader(
        dataset,
        batch_size=spec.train.batch_size,
        rank=rank,
        world_size=world_size,
        seed=spec.train.seed,
        num_workers=spec.data.num_loader_workers,
        cursor=cursor,
        batch_transform=processor.preprocess if processor is not None else None,
    )
