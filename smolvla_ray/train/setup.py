"""What a worker builds before step 1: the policy with the spec's overrides, its processor
from the dataset's statistics, and this worker's shard of the data."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from smolvla_ray.cache.store import CachedFeatures, CacheStore
from smolvla_ray.data import layout
from smolvla_ray.data.loader import ShardedLoader
from smolvla_ray.data.meta import DatasetMeta, check_cameras, load_meta
from smolvla_ray.data.samples import FrameDataset
from smolvla_ray.data.storage import DEFAULT_CACHE_DIR, FileCache
from smolvla_ray.policy.config import OBS_IMAGES, PolicyConfig
from smolvla_ray.policy.modeling import SmolVLAPolicy
from smolvla_ray.policy.pretrained import load_pretrained
from smolvla_ray.policy.processor import PolicyProcessor
from smolvla_ray.spec import JobSpec


def dataset_cameras(meta: DatasetMeta, names: list[str] | None) -> dict[str, tuple[int, int, int]]:
    """Camera name -> (C, H, W) from `info.json`, for the chosen cameras (default: all)."""
    keys = [layout.camera_key(n) for n in names] if names else list(meta.camera_keys)
    if names:
        check_cameras(meta, names)
    cameras = {}
    for key in keys:
        height, width, channels = meta.features[key]["shape"]
        cameras[key.removeprefix(f"{OBS_IMAGES}.")] = (int(channels), int(height), int(width))
    return cameras


def build_policy(
    spec: JobSpec, meta: DatasetMeta, *, storage_options: Mapping[str, Any]
) -> SmolVLAPolicy:
    """The policy with the spec's overrides, checked against the dataset it will train on."""
    updates = spec.policy.config_updates()
    if spec.policy.pretrained:
        policy = load_pretrained(
            spec.policy.pretrained,
            prefix_mode=spec.policy.prefix_mode,
            config_overrides=updates,
            **storage_options,
        )
        check_cameras(meta, list(policy.config.image_features))
    else:
        config = PolicyConfig.preset(spec.policy.preset, **updates).with_features(
            state_dim=meta.feature_dim(layout.STATE_KEY),
            action_dim=meta.feature_dim(layout.ACTION_KEY),
            cameras=dataset_cameras(meta, spec.data.cameras),
        )
        # Every worker seeds the same way, so random-init backbones agree (and are checked).
        torch.manual_seed(spec.train.seed)
        policy = SmolVLAPolicy(config, prefix_mode=spec.policy.prefix_mode)
    for key, dim in [
        (layout.STATE_KEY, policy.config.state_dim),
        (layout.ACTION_KEY, policy.config.action_dim),
    ]:
        if meta.feature_dim(key) != dim:
            raise ValueError(
                f"the dataset's {key} has {meta.feature_dim(key)} dims but the policy expects "
                f"{dim}; finetune from a checkpoint trained on this robot or use a preset"
            )
    policy.processor = PolicyProcessor(policy.config, meta.stats)
    return policy


def episode_selection(spec: JobSpec) -> list[int] | range | None:
    episodes = spec.data.episodes
    if episodes is None or isinstance(episodes, list):
        return episodes
    return range(episodes.start, episodes.stop)


def open_dataset(spec: JobSpec, *, storage_options: Mapping[str, Any]) -> DatasetMeta:
    return load_meta(spec.data.uri, storage_options=storage_options)


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
    camera_keys = list(policy.config.image_features)
    dataset: Dataset = FrameDataset(
        meta,
        episodes=episode_selection(spec),
        cameras=[] if feature_cache else [k.removeprefix(f"{OBS_IMAGES}.") for k in camera_keys],
        chunk_size=policy.config.chunk_size,
        storage_options=storage_options,
        cache=cache,
    )
    if feature_cache:
        episodes = sorted({int(e) for e in dataset.frames.episode_index})
        local = cache_dir / "features" / feature_cache.rstrip("/").rsplit("/", 1)[-1]
        CacheStore(feature_cache, storage_options).fetch(episodes, local)
        dataset = CachedFeatures(dataset, local, camera_keys)
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
