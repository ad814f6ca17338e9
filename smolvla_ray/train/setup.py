"""This worker's shard of the data: frames (or cached vision features) of the selected
episodes, preprocessed by the policy's processor, in a resumable sharded loader."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from smolvla_ray.build import (
    cached_episodes,
    eval_episodes,
    mixture_episodes,
    mixture_eval_episodes,
    mixture_run_episodes,
    open_mixture,
    run_episodes,
)
from smolvla_ray.cache.store import CachedFeatures, FeatureShards
from smolvla_ray.data.augment import MixtureAugmenter, SampleAugmenter
from smolvla_ray.data.loader import ShardedLoader
from smolvla_ray.data.meta import DatasetMeta
from smolvla_ray.data.mixture import MixtureDataset
from smolvla_ray.data.samples import FrameDataset
from smolvla_ray.data.storage import FileCache, Storage, node_cache_dir
from smolvla_ray.policy.modeling import SmolVLAPolicy
from smolvla_ray.settings import RunSettings
from smolvla_ray.train.evaluation import HeldOut, evenly_spaced
from smolvla_ray.train.mixture import ConformedDataset, ConformSample, TokenizeTasks


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
    features: FeatureShards | Mapping[str, FeatureShards] | None = None,
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
    (`train/mixture.py`), with each dataset's own feature cache when `features` holds them
    by name; with `data.augment` on, the loader processes then augment the cameras each
    sample's dataset has (`MixtureAugmenter`, keyed by its dataset's name too)."""
    if settings.data.mixture is not None:
        if isinstance(features, FeatureShards):
            raise RuntimeError("a mixture reads one feature cache per dataset, by name")
        return _mixture_loader(
            settings, policy, rank=rank, world_size=world_size, cursor=cursor,
            storage_options=storage_options, device=device, features=features,
        )  # fmt: skip
    if features is not None and not isinstance(features, FeatureShards):
        raise RuntimeError("one dataset reads one feature cache, not one per dataset")
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
    features: Mapping[str, FeatureShards] | None,
) -> ShardedLoader:
    resolution, processors = policy.feature_resolution, policy.mixture_processors
    if resolution is None or not resolution.datasets or not processors:
        raise RuntimeError("a mixture's policy needs its per-dataset resolution and processors")
    augment = settings.data.augment
    if augment is not None and features:
        raise RuntimeError("augmented images have no cached features: the feature cache is off")
    metas = open_mixture(settings, storage_options=storage_options)
    datasets, transforms = _mixture_frames(
        settings, policy, metas, mixture_run_episodes(settings, metas),
        storage_options=storage_options, features=features, uint8=augment is None,
    )  # fmt: skip
    # Augmented after ConformSample, so a camera the dataset lacks (the -1 fill, masked out)
    # is never augmented, and by the dataset's own camera key, as one dataset's.
    augmenter = (
        MixtureAugmenter(
            augment,
            tuple(
                (d.name, tuple((k, v) for k, v in resolution.datasets[d.name].sources.items()
                               if v is not None))
                for d in settings.data.mixture or ()
            ),
            seed=settings.train.seed,
        )
        if augment is not None
        else None
    )  # fmt: skip
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
        sample_transform=augmenter,
        batch_transform=TokenizeTasks(next(iter(processors.values()))),
        pin_memory=device.type == "cuda",
    )


def build_held_out(
    settings: RunSettings,
    meta: DatasetMeta,
    policy: SmolVLAPolicy,
    *,
    storage_options: Mapping[str, Any],
    features: FeatureShards | Mapping[str, FeatureShards] | None = None,
) -> HeldOut | dict[str, HeldOut] | None:
    """The run's held-out samples (None without an eval section): the frames of the
    held-out episodes, read like the training frames (the feature cache when it is on),
    never augmented, `eval.max_samples` of them evenly spaced. A mixture's: one `HeldOut`
    per dataset, by name, each of its samples conformed as in training (its own statistics,
    masks and dataset index), `eval.max_samples` per dataset."""
    if settings.eval is None:
        return None
    if settings.data.mixture is not None:
        if isinstance(features, FeatureShards):
            raise RuntimeError("a mixture reads one feature cache per dataset, by name")
        return _mixture_held_out(settings, policy, storage_options=storage_options,
                                 features=features)  # fmt: skip
    if features is not None and not isinstance(features, FeatureShards):
        raise RuntimeError("one dataset reads one feature cache, not one per dataset")
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


def _mixture_held_out(
    settings: RunSettings,
    policy: SmolVLAPolicy,
    *,
    storage_options: Mapping[str, Any],
    features: Mapping[str, FeatureShards] | None,
) -> dict[str, HeldOut]:
    assert settings.eval is not None
    resolution, processors = policy.feature_resolution, policy.mixture_processors
    if resolution is None or not resolution.datasets or not processors:
        raise RuntimeError("a mixture's policy needs its per-dataset resolution and processors")
    metas = open_mixture(settings, storage_options=storage_options)
    held = mixture_eval_episodes(settings, metas)
    datasets, transforms = _mixture_frames(
        settings, policy, metas, held, storage_options=storage_options, features=features,
        uint8=True,
    )  # fmt: skip
    tokenize = TokenizeTasks(next(iter(processors.values())))
    out = {}
    for position, (d, frames, conform) in enumerate(
        zip(settings.data.mixture or (), datasets, transforms, strict=True)
    ):
        dataset = ConformedDataset(frames, conform, position)
        out[d.name] = HeldOut(
            dataset,
            evenly_spaced(len(dataset), settings.eval.max_samples),
            batch_size=settings.eval.batch_size,
            num_workers=min(settings.data.num_loader_workers, 1),
            transform=tokenize,
            action_dim=resolution.datasets[d.name].action_dim,
            postprocess=processors[d.name].postprocess,
        )
    return out


def _mixture_frames(
    settings: RunSettings,
    policy: SmolVLAPolicy,
    metas: Mapping[str, DatasetMeta],
    episodes: Mapping[str, list[int]],
    *,
    storage_options: Mapping[str, Any],
    features: Mapping[str, FeatureShards] | None,
    uint8: bool,
) -> tuple[list[Dataset], list[ConformSample]]:
    """Each mixture dataset's frames of `episodes` (by name, in the spec's order) and the
    `ConformSample` that puts them in the policy's shape."""
    resolution, processors = policy.feature_resolution, policy.mixture_processors
    assert resolution is not None and resolution.datasets and processors
    cache = FileCache(
        directory=node_cache_dir(settings.data.cache_dir) / "files",
        max_bytes=settings.data.cache_max_bytes,
    )
    uint8 = uint8 and all(p.takes_uint8_images() for p in processors.values())
    image_dtype = torch.uint8 if uint8 else torch.float32
    # With the feature cache, a camera a dataset lacks is fed what the encoder makes of the
    # video path's all -1 image, computed once here.
    empty = empty_camera_features(settings, policy) if features else None
    datasets: list[Dataset] = []
    transforms = []
    for d in settings.data.mixture or ():
        own = resolution.datasets[d.name]
        sources = [v for v in own.sources.values() if v is not None]
        frames: Dataset = FrameDataset(
            metas[d.name],
            episodes=episodes[d.name],
            cameras=[] if features else sources,
            chunk_size=policy.config.chunk_size,
            storage_options=storage_options,
            cache=cache,
            image_dtype=image_dtype,
        )
        if features:  # this dataset's own cache, its cameras stored by policy key
            frames = CachedFeatures(frames, features[d.name], list(own.sources))
        datasets.append(frames)
        transforms.append(
            ConformSample(
                own, resolution, processors[d.name], image_dtype=image_dtype, empty_features=empty
            )
        )
    return datasets, transforms


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


def empty_camera_features(settings: RunSettings, policy: SmolVLAPolicy) -> dict[str, Tensor]:
    """Per policy camera, (tokens, hidden): the cached features of an empty camera's all -1
    image, as the cache build would store them (the run's precision, then the cache's dtype),
    so a mixture sample lacking the camera gets from the cache what the video path encodes."""
    device = next(policy.parameters()).device
    dtype = getattr(torch, settings.data.feature_cache_dtype)
    autocast = settings.train.precision == "bf16"
    out = {}
    for key in policy.config.image_features:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            features = policy.empty_camera_features(key)
        out[key] = features[0].to("cpu", dtype).to(torch.float32)
    return out


def fetch_feature_cache(
    settings: RunSettings,
    meta: DatasetMeta,
    feature_cache: str | Mapping[str, str] | None,
    storage_options: Mapping[str, Any],
) -> FeatureShards | dict[str, FeatureShards] | None:
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
    if isinstance(feature_cache, str):
        shards = FeatureShards(Storage(feature_cache, storage_options), cache)
        shards.warm(cached_episodes(settings, meta))
        return shards
    # A mixture: each dataset's own cache (`feature_cache` by name), all through the node's
    # one bounded copy, warmed in the spec's order while they fit it together.
    episodes = mixture_episodes(settings, open_mixture(settings, storage_options=storage_options))
    out, budget = {}, data.cache_max_bytes
    for d in data.mixture or ():
        out[d.name] = FeatureShards(Storage(feature_cache[d.name], storage_options), cache)
        budget -= out[d.name].warm(episodes[d.name], max_bytes=max(budget, 0))
    return out
