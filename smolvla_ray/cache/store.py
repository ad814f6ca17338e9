"""The frozen-feature cache in storage: its key, its layout, and reading it during training.

When the vision encoder and connector are frozen (and in eval mode) and no random
augmentation is on, their output for a (frame, camera) never changes (docs/design.md
invariant 3). The cache holds that output for every frame, one safetensors shard per
episode, under `<checkpoint.storage>/feature-cache/<key>/`:

    key.json                what the key was computed from
    episode_000123.safetensors   per camera key: (frames, tokens, hidden), in frame order
    complete.json           written last, once every shard is there

The key covers the frozen vision weights, the image preprocessing, the dataset's identity and
revision (metadata and video file sizes) and the dtype, so any change makes a new cache. The
driver computes it without building the policy (`key_inputs`): the weights are identified
from their safetensors file, or for a random-init preset from what seeds them.

Training reads the shards through each node's bounded LRU file cache (`FeatureShards`), so
a cache larger than `data.cache_max_bytes` still trains, re-downloading evicted shards.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from torch import Tensor
from torch.utils.data import Dataset

from smolvla_ray import hub
from smolvla_ray.data.meta import DatasetMeta
from smolvla_ray.data.storage import FileCache, Storage
from smolvla_ray.keys import FEATURES_SUFFIX
from smolvla_ray.policy.config import PolicyConfig
from smolvla_ray.policy.fingerprint import combine_digests, safetensors_digests
from smolvla_ray.storage import filesystem, join

if TYPE_CHECKING:
    from smolvla_ray.features import FeatureResolution
    from smolvla_ray.settings import RunSettings

# 2: cameras keyed by policy key with their dataset source; 3: encoded in the run's precision
FORMAT_VERSION = 3
COMPLETE = "complete.json"
KEY_FILE = "key.json"


def shard_name(episode: int) -> str:
    return f"episode_{episode:06d}.safetensors"


# State-dict prefixes of the towers whose output the cache holds (SmolVLAPolicy's names).
VISION_PREFIXES = (
    "model.vlm_with_expert.vlm.model.vision_model.",
    "model.vlm_with_expert.vlm.model.connector.",
)
# The same towers in a SmolVLM checkpoint (`load_vlm_weights`), whatever its key layout.
VLM_VISION_FRAGMENTS = ("vision_model.", "connector.")


def pretrained_weights_file(
    source: str,
    directory: Path,
    *,
    revision: str | None = None,
    storage_options: Mapping[str, Any],
) -> Path:
    """A local path to `source`'s `model.safetensors` alone: in a local directory itself, a
    hub id's file in the Hugging Face cache (at `revision`), else a copy into `directory`."""
    from smolvla_ray.policy.pretrained import WEIGHTS_NAME

    if "://" not in source:
        local = Path(source).expanduser()
        if local.is_dir():
            path = local / WEIGHTS_NAME
            if not path.is_file():
                raise FileNotFoundError(f"{source}: no {WEIGHTS_NAME}")
            return path

        if hub.is_hub_id(source):
            return hub.model_file(source, WEIGHTS_NAME, revision=revision)
        raise FileNotFoundError(f"pretrained policy directory {source!r} does not exist")
    fs, root = filesystem(source, storage_options)
    remote = join(root, WEIGHTS_NAME)
    if not fs.exists(remote):
        raise FileNotFoundError(f"{source}: no {WEIGHTS_NAME}")
    target = directory / WEIGHTS_NAME
    fs.get_file(remote, str(target))
    return target


def vision_identity(
    settings: RunSettings, config: PolicyConfig, *, storage_options: Mapping[str, Any]
) -> dict[str, Any]:
    """What the vision encoder's and connector's weights are, without building the policy.

    A pretrained run: the digests of those tensors in its `model.safetensors` (read one at a
    time; the rule hashes a bf16-stored file as its float32 load). A preset with
    `load_vlm_weights`: the same towers' tensors in the VLM's weights. A preset with random
    weights: what seeds them (preset, seed, the VLM's architecture).
    """
    policy = settings.policy
    if policy.pretrained:
        with tempfile.TemporaryDirectory(prefix="smolvla-cache-key-") as tmp:
            path = pretrained_weights_file(
                policy.pretrained,
                Path(tmp),
                revision=policy.revision,
                storage_options=storage_options,
            )
            digests = safetensors_digests(path, lambda name: name.startswith(VISION_PREFIXES))
        if not digests:
            raise ValueError(
                f"{policy.pretrained}: its model.safetensors holds no vision encoder "
                f"tensor ({VISION_PREFIXES[0]}*); is it a SmolVLA checkpoint?"
            )
        return {"pretrained_weights": combine_digests(digests)}
    if config.load_vlm_weights:
        from smolvla_ray.policy.backbone import vlm_weights_dir

        digests = {}
        for file in sorted(vlm_weights_dir(config.vlm_model_name).glob("*.safetensors")):
            digests.update(
                safetensors_digests(file, lambda n: any(f in n for f in VLM_VISION_FRAGMENTS))
            )
        return {"vlm_weights": combine_digests(dict(sorted(digests.items())))}
    return {
        "preset": policy.preset,
        "seed": settings.train.seed,
        "vlm_config": _vlm_architecture(config.vlm_model_name),
    }


def _vlm_architecture(vlm_model_name: str) -> dict[str, Any]:
    """The VLM config a random-init policy builds from, without machine-local paths."""
    from smolvla_ray.policy.backbone import load_vlm_config

    data = json.loads(load_vlm_config(vlm_model_name).to_json_string(use_diff=False))
    data["text_config"]["tie_word_embeddings"] = False  # as SmolVLMWithExpert sets it
    for part in (data, data.get("text_config", {}), data.get("vision_config", {})):
        part.pop("_name_or_path", None)
    return data


def key_inputs(
    settings: RunSettings,
    config: PolicyConfig,
    resolution: FeatureResolution,
    meta: DatasetMeta,
    *,
    storage_options: Mapping[str, Any],
) -> dict[str, Any]:
    """Everything the cached features depend on, as JSON, from the resolved config and
    features (`resolve_dataset_features`) and the weights' files; no model is built."""
    storage = meta.storage
    videos = sorted({ref.file for ep in meta.episodes for ref in ep.videos.values()})
    sizes = {v: int(storage.fs.size(storage.path(v))) for v in videos}
    episodes = [
        [ep.episode_index, ep.length, {k: [r.file, r.from_timestamp] for k, r in ep.videos.items()}]
        for ep in meta.episodes
    ]
    sources = resolution.sources
    return {
        "format": FORMAT_VERSION,
        "dtype": settings.data.feature_cache_dtype,
        "vision_weights": vision_identity(settings, config, storage_options=storage_options),
        "resize_imgs_with_padding": config.resize_imgs_with_padding,
        # Policy camera -> the dataset camera it is encoded from: swapping two cameras in
        # data.rename_map is another cache, never the other camera's features.
        "cameras": {
            key: {"source": sources.get(key), "shape": list(f.shape)}
            for key, f in config.image_features.items()
        },
        "rename_map": dict(sorted(resolution.rename_map.items())),
        # The precision the encoder runs in, the run's (bf16 autocast on GPU by default), so
        # that cached features are what a live bf16 step computes; `dtype` is how they are
        # stored.
        "encode_precision": settings.train.precision,
        "dataset": {
            "url": hub.canonical_dataset_url(storage.url),
            "info": hashlib.sha256(json.dumps(meta.info, sort_keys=True).encode()).hexdigest(),
            "episodes": hashlib.sha256(json.dumps(episodes).encode()).hexdigest(),
            "video_sizes": sizes,
        },
    }


def cache_key(inputs: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]


class CacheStore:
    """One cache directory at any fsspec URL."""

    def __init__(self, root: str, storage_options: Mapping[str, Any]) -> None:
        self.root = root
        self.storage_options = dict(storage_options)
        self.fs, self.path = filesystem(root, self.storage_options)

    def _p(self, name: str) -> str:
        return join(self.path, name)

    def shards(self) -> set[int]:
        """Episodes whose shard is in storage (finished uploads only)."""
        return set(self.shard_sizes())

    def shard_sizes(self) -> dict[int, int]:
        """Episode -> its shard's size in bytes, from one listing (finished uploads only)."""
        try:
            entries = self.fs.ls(self.path, detail=True)
        except FileNotFoundError:
            return {}
        sizes = {}
        for entry in entries:
            name = entry["name"].rsplit("/", 1)[-1]
            if name.startswith("episode_") and name.endswith(".safetensors"):
                episode = int(name.removeprefix("episode_").removesuffix(".safetensors"))
                sizes[episode] = int(entry["size"])
        return sizes

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


@dataclass(frozen=True)
class FeatureShards:
    """The feature cache's shards as a node reads them: in place when `storage` is local (a
    path or file://, as `FrameDataset` reads local videos), else through `cache`, the node's
    bounded LRU file cache, which its workers and loader processes share (one download per
    shard while the node holds it; least recently read shards evicted beyond its bound)."""

    storage: Storage
    cache: FileCache

    def path(self, episode: int) -> Path:
        """A local path with `episode`'s shard, downloaded if the node does not hold it (and
        marked as just read, for the LRU order)."""
        name = shard_name(episode)
        if self.storage.is_local:
            return Path(self.storage.path(name))
        return self.cache.local_path(self.storage, name)

    def warm(self, episodes: Sequence[int], *, max_bytes: int | None = None) -> int:
        """Download the shards of `episodes`, in order, while they fit within `max_bytes`
        (the cache's bound when None; usually all of them); returns the bytes the node then
        holds of them (0 when read in place). A mixture warms each dataset's cache within
        what the ones before it left of the one bound."""
        if self.storage.is_local:
            return 0
        bound = self.cache.max_bytes if max_bytes is None else max_bytes
        sizes = CacheStore(self.storage.url, self.storage.storage_options).shard_sizes()
        total = 0
        for episode in episodes:
            name = shard_name(episode)
            if episode not in sizes:
                raise FileNotFoundError(f"{self.storage.display(name)} does not exist")
            if total + sizes[episode] > bound:
                break
            self.cache.local_path(self.storage, name, size=sizes[episode])
            total += sizes[episode]
        return total


class CachedFeatures(Dataset):
    """Wraps a video-free `FrameDataset` (no cameras) and adds each sample's cached vision
    features from `shards`, opened lazily per process (safe with forked loaders).

    Each process keeps its shards open. A shard the node's LRU evicts stays readable through
    an open handle, but its disk space is only freed once no process holds it: when a shard
    turns out to have been evicted and fetched again, this process lets go of all its
    handles (and reopens the shards as it reads them), so it holds evicted files briefly."""

    def __init__(self, frames: Dataset, shards: FeatureShards, camera_keys: Sequence[str]) -> None:
        self.frames = frames
        self.shards = shards
        self.camera_keys = list(camera_keys)
        self._open: dict[int, tuple[int, Any]] = {}  # episode -> (inode, safe_open handle)

    def __len__(self) -> int:
        return len(self.frames)  # type: ignore[arg-type]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": {}}

    def _shard(self, episode: int):
        held = self._open.get(episode)
        # Another process's eviction may remove a shard between our fetch and our open (only
        # when the bound holds about one shard): fetch it again.
        for _ in range(3):
            path = self.shards.path(episode)
            try:
                inode = path.stat().st_ino
                if held is not None and held[0] == inode:
                    return held[1]
                handle = safe_open(str(path), framework="pt")
            except FileNotFoundError:
                continue
            if held is not None:  # evicted and fetched again: free the evicted files we hold
                self._open.clear()
            self._open[episode] = (inode, handle)
            return handle
        raise FileNotFoundError(
            f"the feature cache's shard of episode {episode} was evicted before it could be "
            "opened, three times: raise data.cache_max_bytes to hold a few shards"
        )

    def __getitem__(self, row: int) -> dict[str, Any]:
        sample = self.frames[row]
        shard = self._shard(int(sample["episode_index"]))
        frame = int(sample["frame_index"])
        for key in self.camera_keys:
            sample[f"{key}{FEATURES_SUFFIX}"] = shard.get_slice(key)[frame].to(torch.float32)
        return sample
