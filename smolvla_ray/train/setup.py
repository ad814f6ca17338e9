"""This worker's shard of the data: frames (or cached vision features) of the selected
episodes, preprocessed by the policy's processor, in a resumable sharded loader."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import Dataset

from smolvla_ray.build import (
    cached_episodes,
    eval_episodes,
    mixture_episodes,
    open_mixture,
    run_episodes,
)
from smolvla_ray.cache.store import CachedFeatures, FeatureShards
from smolvla_ray.data.augment import SampleAugmenter
from smolvla_ray.data.loader import ShardedLoader
from smolvla_ray.data.meta import DatasetMeta
from smolvla_ray.data.mixture import MixtureDataset
from smolvla_ray.data.samples import FrameDataset
from smolvla_ray.data.storage import FileCache, Storage, node_cache_dir
from smolvla_ray.policy.modeling import SmolVLAPolicy
from smolvla_ray.settings import RunSettings
from smolvla_ray.train.evaluation import HeldOut, evenly_spaced
from smolvla_ray.train.mixture import ConformSample, TokenizeTasks


def build_loader(
    settings: RunSettings,
    meta: DatasetMeta,
    policy: SmolVLAPolicy,
    *,
    rank: int,
    world_size: int,
    cursor: dict[str, Any] | None,
    storage_options: Mapping[str, Any],
    device: torch.device,
    features: FeatureShards | None = None,
) -> ShardedLoader:
    """This worker's share of each epoch, preprocessed by the policy's processor. With
    `features` (the feature cache as this node reads it, `fetch_feature_cache`) the samples
    carry cached vision features and no video is decoded.

    With `data.augment` on, the loader processes augment each sample (keyed by seed, epoch,
    index and dataset camera key) and images stay float32 in [0, 1]: quantizing augmented
    images back to uint8 would change them. Otherwise frames travel as uint8, a quarter of
    the bytes, and the step's `to_device` scales them on the device, to exactly the same
    floats. For a CUDA `device` batches are collated into pinned memory.

    A mixture (`data.datasets`) draws its epochs by weight from every dataset's selected
    frames (`data/mixture.py`), each sample made like the others in the loader processes
    (`train/mixture.py`); it reads video (no feature cache) and is not augmented."""
    if settings.data.mixture is not None:
        return _mixture_loader(
            settings, policy, rank=rank, world_size=world_size, cursor=cursor,
            storage_options=storage_options, device=device,
        )  # fmt: skip
    sources = policy.feature_resolution.sources  # policy camera key -> dataset camera key
    processor = policy.processor
    augment, seed = settings.data.augment, settings.train.seed
    dataset = _frames(
        settings, meta, policy, run_episodes(settings, meta), storage_options=storage_options,
        features=features, uint8=augment is None,
    )  # fmt: skip
    augmenter = SampleAugmenter(augment, tuple(sources.values()), seed=seed) if augment else None
    return ShardedLoader(
        dataset,
        batch_size=settings.train.batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        num_workers=settings.data.num_loader_workers,
        cursor=cursor,
        sample_transform=augmenter,
        batch_transform=processor.preprocess if processor is not None else None,
        pin_memory=device.type == "cuda",
    )


def _mixture_loader(
    settings: RunSettings,
    policy: SmolVLAPolicy,
    *,
    rank: int,
    world_size: int,
    cursor: dict[str, Any] | None,
    storage_options: Mapping[str, Any],
    device: torch.device,
) -> ShardedLoader:
    resolution, processors = policy.feature_resolution, policy.mixture_processors
    if resolution is None or not resolution.datasets or not processors:
        raise RuntimeError("a mixture's policy needs its per-dataset resolution and processors")
    metas = open_mixture(settings, storage_options=storage_options)
    episodes = mixture_episodes(settings, metas)
    cache = FileCache(
        directory=node_cache_dir(settings.data.cache_dir) / "files",
        max_bytes=settings.data.cache_max_bytes,
    )
    uint8 = all(p.takes_uint8_images() for p in processors.values())
    image_dtype = torch.uint8 if uint8 else torch.float32
    datasets, transforms = [], []
    for d in settings.data.mixture or ():
        own = resolution.datasets[d.name]
        sources = [v for v in own.sources.values() if v is not None]
        datasets.append(
            FrameDataset(
                metas[d.name],
                episodes=episodes[d.name],
                cameras=sources,
                chunk_size=policy.config.chunk_size,
                storage_options=storage_options,
                cache=cache,
                image_dtype=image_dtype,
            )
        )
        transforms.append(
            ConformSample(own, resolution, processors[d.name], image_dtype=image_dtype)
        )
    mixture = MixtureDataset(
        datasets,
        [d.weight for d in settings.data.mixture or ()],
        length=settings.data.epoch_samples,
        transforms=transforms,
    )
    return ShardedLoader(
        mixture,
        batch_size=settings.train.batch_size,
        rank=rank,
        world_size=world_size,
        seed=settings.train.seed,
        num_workers=settings.data.num_loader_workers,
        cursor=cursor,
        batch_transform=TokenizeTasks(next(iter(processors.values()))),
        pin_memory=device.type == "cuda",
    )


def build_held_out(
    settings: RunSettings,
    meta: DatasetMeta,
    policy: SmolVLAPolicy,
    *,
    storage_options: Mapping[str, Any],
    features: FeatureShards | None = None,
) -> HeldOut | None:
    """The run's held-out samples (None without an eval section): the frames of the
    held-out episodes, read like the training frames (the feature cache when it is on),
    never augmented, `eval.max_samples` of them evenly spaced."""
    if settings.eval is None:
        return None
    dataset = _frames(
        settings, meta, policy, eval_episodes(settings, meta), storage_options=storage_options,
        features=features, uint8=True,
    )  # fmt: skip
    processor = policy.processor
    return HeldOut(
        dataset,
        evenly_spaced(len(dataset), settings.eval.max_samples),  # type: ignore[arg-type]
        batch_size=settings.eval.batch_size,
        num_workers=min(settings.data.num_loader_workers, 1),
        transform=processor.preprocess if processor is not None else None,
    )


def _frames(
    settings: RunSettings,
    meta: DatasetMeta,
    policy: SmolVLAPolicy,
    episodes: list[int],
    *,
    storage_options: Mapping[str, Any],
    features: FeatureShards | None,
    uint8: bool,
) -> Dataset:
    """The frames of `episodes` (video through the node's file cache, or cached features),
    as uint8 images when asked and the processor leaves images alone."""
    cache = FileCache(
        directory=node_cache_dir(settings.data.cache_dir) / "files",
        max_bytes=settings.data.cache_max_bytes,
    )
    sources = policy.feature_resolution.sources  # policy camera key -> dataset camera key
    processor = policy.processor
    uint8 = uint8 and (processor is None or processor.takes_uint8_images())
    dataset: Dataset = FrameDataset(
        meta,
        episodes=episodes,
        cameras=[] if features else list(sources.values()),
        chunk_size=policy.config.chunk_size,
        storage_options=storage_options,
        cache=cache,
        image_dtype=torch.uint8 if uint8 else torch.float32,
    )
    if features:
        dataset = CachedFeatures(dataset, features, list(sources))  # stored by policy key
    return dataset


def fetch_feature_cache(
    settings: RunSettings,
    meta: DatasetMeta,
    feature_cache: str | None,
    storage_options: Mapping[str, Any],
) -> FeatureShards | None:
    """The feature cache at `feature_cache` as this node reads it (None without a cache),
    its node-local copy warmed first.

    Training reads each shard through the node's LRU file cache under
    `<data.cache_dir>/features`, bounded by `data.cache_max_bytes` (the videos' own cache
    keeps its bound), so a cache bigger than the bound still trains (`data.feature_cache:
    on`), re-downloading the shards it evicts. Warming downloads, once per node, the shards
    of the run's episodes that fit the bound: all of them in the common case, so the steps
    never wait on a download. The trainer calls this before its first collective, so a long
    download never holds the other workers inside one until the collective timeout."""
    if not feature_cache:
        return None
    data = settings.data
    cache = FileCache(node_cache_dir(data.cache_dir) / "features", max_bytes=data.cache_max_bytes)
    shards = FeatureShards(Storage(feature_cache, storage_options), cache)
    shards.warm(cached_episodes(settings, meta))
    return shards
