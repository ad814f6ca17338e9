"""Building the frozen-feature cache: a Ray pass over the dataset's episodes.

The driver decides whether the cache applies (`data.feature_cache` and whether the features
are constant), computes the key, and starts one Ray task per group of missing episodes (GPU
tasks when the run uses GPUs). Each task builds the policy as the workers will, decodes its
episodes once, runs the frozen vision encoder + connector, and uploads a shard per episode.
A build interrupted part-way keeps its shards; a complete cache is reused as it is.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import Any

import torch

from smolvla_ray.cache.store import (
    COMPLETE,
    KEY_FILE,
    CacheStore,
    cache_key,
    cache_root,
    key_inputs,
)
from smolvla_ray.spec import JobSpec

ENCODE_BATCH = 32


def say(message: str) -> None:
    sys.stderr.write(f"[smolvla-ray] {message}\n")
    sys.stderr.flush()


def encode_episodes(
    spec_dict: dict, storage_options: Mapping[str, Any], root: str, episodes: list[int]
) -> dict[str, float]:
    """Ray task body: encode and upload the shards of `episodes`; returns timing."""
    from smolvla_ray.data.samples import FrameDataset
    from smolvla_ray.train.setup import build_policy, open_dataset

    spec = JobSpec.model_validate(spec_dict)
    device = torch.device("cuda" if spec.scaling.use_gpu and torch.cuda.is_available() else "cpu")
    meta = open_dataset(spec, storage_options=storage_options)
    policy = build_policy(spec, meta, storage_options=storage_options).to(device).eval()
    dtype = getattr(torch, spec.data.feature_cache_dtype)
    store = CacheStore(root, storage_options)
    # Shards hold the cameras under the policy's keys, each encoded from its renamed source.
    sources = policy.feature_resolution.sources
    start, frames = time.perf_counter(), 0
    for episode in episodes:
        dataset = FrameDataset(
            meta,
            episodes=[episode],
            cameras=list(sources.values()),
            chunk_size=1,
            storage_options=storage_options,
        )
        outputs: dict[str, list[torch.Tensor]] = {}
        for first in range(0, len(dataset), ENCODE_BATCH):
            rows = range(first, min(first + ENCODE_BATCH, len(dataset)))
            samples = [dataset[i] for i in rows]
            batch = {
                key: torch.stack([s[source] for s in samples]).to(device)
                for key, source in sources.items()
            }
            for key, value in policy.encode_images(batch).items():
                outputs.setdefault(key.removesuffix(".features"), []).append(value.to("cpu"))
        store.write_shard(episode, {k: torch.cat(v).to(dtype) for k, v in outputs.items()})
        frames += len(dataset)
    return {"frames": frames, "seconds": time.perf_counter() - start}


def ensure_feature_cache(spec: JobSpec, storage_options: Mapping[str, Any]) -> str | None:
    """The cache root to train from, building what is missing; None when not used."""
    mode = spec.data.feature_cache
    if mode == "off":
        return None
    blocker = spec.feature_cache_blocker()
    from smolvla_ray.train.setup import build_policy, episode_selection, open_dataset

    meta = open_dataset(spec, storage_options=storage_options)
    policy = build_policy(spec, meta, storage_options=storage_options)
    if blocker is None and not all(
        not p.requires_grad for p in policy.model.vlm_with_expert.vision_model.parameters()
    ):
        blocker = "the policy's vision encoder is trainable (its checkpoint's overrides)"
    if blocker is not None:
        if mode == "on":
            raise ValueError(f"data.feature_cache='on' but {blocker}; use auto or off")
        say(f"feature cache not used: {blocker}")
        return None
    inputs = key_inputs(policy, meta, spec.data.feature_cache_dtype)
    root = cache_root(spec.checkpoint.storage, cache_key(inputs))
    store = CacheStore(root, storage_options)
    selected = episode_selection(spec)
    wanted = list(selected) if selected is not None else [e.episode_index for e in meta.episodes]
    present = store.shards()
    missing = [e for e in wanted if e not in present]
    if not missing:
        say(f"using feature cache {root}")
        return root
    say(f"building feature cache {root}: {len(missing)} of {len(wanted)} episodes to encode")
    store.write_json(KEY_FILE, inputs)
    if missing:
        import ray

        groups = max(1, min(spec.scaling.num_workers, len(missing)))
        resources = {"num_gpus": 1} if spec.scaling.use_gpu else {"num_cpus": 1}
        task = ray.remote(**resources)(encode_episodes)
        spec_dict = spec.public_dict()
        options_ref = ray.put(dict(storage_options))
        refs = [
            task.remote(spec_dict, options_ref, root, missing[i::groups]) for i in range(groups)
        ]
        stats = ray.get(refs)
        frames = sum(s["frames"] for s in stats)
        seconds = sum(s["seconds"] for s in stats)
        say(
            f"feature cache built: {frames} frames in {seconds:.1f} task-seconds "
            f"({seconds / max(frames, 1) * 1000:.1f} ms per frame)"
        )
    if len(store.shards()) == len(meta.episodes):
        store.write_json(COMPLETE, {"episodes": len(meta.episodes)})
    return root
