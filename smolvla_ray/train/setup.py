"""This worker's shard of the data: frames (or cached vision features) of the selected
episodes, preprocessed by the policy's processor, in a resumable sharded loader."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from smolvla_ray.build import episode_selection
from smolvla_ray.cache.store import CachedFeatures, CacheStore
from smolvla_ray.data.loader import ShardedLoader
from smolvla_ray.data.meta import DatasetMeta, select_episodes
from smolvla_ray.data.samples import FrameDataset
from smolvla_ray.data.storage import DEFAULT_CACHE_DIR, FileCache
from smolvla_ray.policy.modeling import SmolVLAPolicy
from smolvla_ray.spec import JobSpec


def build_loader(
    spec: JobSpec,
    meta: DatasetMeta,
    policy: SmolVLAPolicy,
    *,
    rank: int,
    world_size: int,
    cursor: dict[str, Any] | None,
    storage_options: Mapping[str, Any],
    features: Path | None = None,
) -> ShardedLoader:
    """This worker's share of each epoch, preprocessed by the policy's processor. With
    `features` (the node's copy of the feature cache, `fetch_feature_cache`) the samples
    carry cached vision features and no video is decoded."""
    cache = FileCache(directory=_cache_dir(spec) / "files", max_bytes=spec.data.cache_max_bytes)
    sources = policy.feature_resolution.sources  # policy camera key -> dataset camera key
    dataset: Dataset = FrameDataset(
        meta,
        episodes=episode_selection(spec),
        cameras=[] if features else list(sources.values()),
        chunk_size=policy.config.chunk_size,
        storage_options=storage_options,
        cache=cache,
    )
    if features:
        dataset = CachedFeatures(dataset, features, list(sources))  # stored by policy key
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


def _cache_dir(spec: JobSpec) -> Path:
    return Path(spec.data.cache_dir).expanduser() if spec.data.cache_dir else DEFAULT_CACHE_DIR


def fetch_feature_cache(
    spec: JobSpec, meta: DatasetMeta, feature_cache: str | None, storage_options: Mapping[str, Any]
) -> Path | None:
    """This node's copy of the feature cache's shards for the run's episodes (fetched once
    per node; None without a cache). The trainer calls it before its first collective, so a
    long download never holds the other workers inside one until the collective timeout."""
    if not feature_cache:
        return None
    episodes = [
        meta.episodes[i].episode_index for i in select_episodes(meta, episode_selection(spec))
    ]
    local = _cache_dir(spec) / "features" / feature_cache.rstrip("/").rsplit("/", 1)[-1]
    return CacheStore(feature_cache, storage_options).fetch(sorted(episodes), local)
