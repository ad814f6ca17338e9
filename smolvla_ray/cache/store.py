"""The frozen-feature cache in storage: its key, its layout, and reading it during training.

When the vision encoder and connector are frozen (and in eval mode) and no random
augmentation is on, their output for a (frame, camera) never changes (shared/DESIGN.md
invariant 3). The cache holds that output for every frame, one safetensors shard per
episode, under `<checkpoint.storage>/feature-cache/<key>/`:

    key.json                what the key was computed from
    episode_000123.safetensors   per camera key: (frames, tokens, hidden), in frame order
    complete.json           written last, once every shard is there

The key covers the frozen vision weights, the image preprocessing, the dataset's identity and
revision (metadata and video file sizes) and the dtype, so any change makes a new cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import fsspec
import torch
from safetensors import safe_open
from torch import Tensor
from torch.utils.data import Dataset

from smolvla_ray.data.meta import DatasetMeta
from smolvla_ray.policy.modeling import FEATURES_SUFFIX, SmolVLAPolicy

FORMAT_VERSION = 2  # 2: cameras keyed by policy key with their dataset source
COMPLETE = "complete.json"
KEY_FILE = "key.json"


def shard_name(episode: int) -> str:
    return f"episode_{episode:06d}.safetensors"


def _tensor_digest(tensor: Tensor) -> str:
    data = tensor.detach().to("cpu").contiguous()
    return hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()


def key_inputs(policy: SmolVLAPolicy, meta: DatasetMeta, dtype: str) -> dict[str, Any]:
    """Everything the cached features depend on, as JSON."""
    towers = policy.model.vlm_with_expert
    vision = {
        name: _tensor_digest(p)
        for module in (towers.vision_model, towers.vlm.model.connector)
        for name, p in module.named_parameters()
    }
    storage = meta.storage
    videos = sorted({ref.file for ep in meta.episodes for ref in ep.videos.values()})
    sizes = {v: int(storage.fs.size(storage.path(v))) for v in videos}
    episodes = [
        [ep.episode_index, ep.length, {k: [r.file, r.from_timestamp] for k, r in ep.videos.items()}]
        for ep in meta.episodes
    ]
    return {
        "format": FORMAT_VERSION,
        "dtype": dtype,
        "vision_weights": hashlib.sha256(json.dumps(vision, sort_keys=True).encode()).hexdigest(),
        "resize_imgs_with_padding": policy.config.resize_imgs_with_padding,
        # Policy camera -> the dataset camera it is encoded from: swapping two cameras in
        # data.rename_map is another cache, never the other camera's features.
        "cameras": {
            key: {"source": policy.feature_resolution.sources.get(key), "shape": list(f.shape)}
            for key, f in policy.config.image_features.items()
        },
        "rename_map": dict(sorted(policy.feature_resolution.rename_map.items())),
        # The precision the encoder ran in (float32 today); the storage dtype is `dtype`.
        "encode_precision": "float32",
        "dataset": {
            "url": storage.url,
            "info": hashlib.sha256(json.dumps(meta.info, sort_keys=True).encode()).hexdigest(),
            "episodes": hashlib.sha256(json.dumps(episodes).encode()).hexdigest(),
            "video_sizes": sizes,
        },
    }


def cache_key(inputs: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]


def cache_root(storage: str, key: str) -> str:
    return f"{storage.rstrip('/')}/feature-cache/{key}"


class CacheStore:
    """One cache directory at any fsspec URL."""

    def __init__(self, root: str, storage_options: Mapping[str, Any]) -> None:
        self.root = root
        self.storage_options = dict(storage_options)
        self.fs, self.path = fsspec.core.url_to_fs(root, **self.storage_options)

    def _p(self, name: str) -> str:
        return f"{self.path.rstrip('/')}/{name}"

    def shards(self) -> set[int]:
        """Episodes whose shard is in storage (finished uploads only)."""
        try:
            names = [p.rsplit("/", 1)[-1] for p in self.fs.ls(self.path, detail=False)]
        except FileNotFoundError:
            return set()
        return {
            int(n.removeprefix("episode_").removesuffix(".safetensors"))
            for n in names
            if n.startswith("episode_") and n.endswith(".safetensors")
        }

    def write_shard(self, episode: int, tensors: Mapping[str, Tensor]) -> None:
        """Upload one episode's shard; the object appears whole or not at all."""
        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / shard_name(episode)
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(local))
            self.fs.makedirs(self.path, exist_ok=True)
            partial = self._p(f".{shard_name(episode)}.partial")
            self.fs.put_file(str(local), partial)
            self.fs.mv(partial, self._p(shard_name(episode)))

    def write_json(self, name: str, payload: Mapping[str, Any]) -> None:
        self.fs.makedirs(self.path, exist_ok=True)
        self.fs.pipe_file(self._p(name), json.dumps(payload, indent=1).encode())

    def fetch(self, episodes: Sequence[int], local_dir: Path) -> Path:
        """Copy the shards of `episodes` to a node-local directory (once per node)."""
        local_dir.mkdir(parents=True, exist_ok=True)
        for episode in episodes:
            target = local_dir / shard_name(episode)
            if target.exists():
                continue
            tmp = target.with_name(f".{target.name}.{os.getpid()}")
            self.fs.get_file(self._p(shard_name(episode)), str(tmp))
            os.replace(tmp, target)  # atomic: concurrent workers of a node agree
        return local_dir


class CachedFeatures(Dataset):
    """Wraps a video-free `FrameDataset` (no cameras) and adds each sample's cached vision
    features from local shards, opened lazily per process (safe with forked loaders)."""

    def __init__(self, frames: Dataset, local_dir: Path, camera_keys: Sequence[str]) -> None:
        self.frames = frames
        self.local_dir = local_dir
        self.camera_keys = list(camera_keys)
        self._open: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.frames)  # type: ignore[arg-type]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": {}}

    def _shard(self, episode: int):
        handle = self._open.get(episode)
        if handle is None:
            handle = safe_open(str(self.local_dir / shard_name(episode)), framework="pt")
            self._open[episode] = handle
        return handle

    def __getitem__(self, row: int) -> dict[str, Any]:
        sample = self.frames[row]
        shard = self._shard(int(sample["episode_index"]))
        frame = int(sample["frame_index"])
        for key in self.camera_keys:
            sample[f"{key}{FEATURES_SUFFIX}"] = shard.get_slice(key)[frame].to(torch.float32)
        return sample
