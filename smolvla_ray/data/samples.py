"""Training samples with LeRobot's semantics, and the collate function that batches them.

For row t of the selected frames a sample holds the camera frames at t's timestamp, the
state, the action chunk t..t+chunk_size-1 of the same episode (steps past the episode end
repeat the last action and are flagged in `action_is_pad`, exactly like LeRobot's
`delta_timestamps` clamping), the task string and the index columns.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from smolvla_ray.data import layout
from smolvla_ray.data.frames import FrameTable, load_frames
from smolvla_ray.data.meta import DatasetMeta, check_cameras, load_meta
from smolvla_ray.data.storage import FileCache
from smolvla_ray.data.video import VideoPool
from smolvla_ray.keys import ACTION, OBS_STATE, camera_key

DEFAULT_CHUNK_SIZE = 50
_INHERITED_POOLS: list[VideoPool] = []  # see FrameDataset._video


class FrameDataset(Dataset):
    """Map-style dataset: `dataset[i]` is the sample of row i of the selected episodes.

    Picklable (the open videos stay behind), so it can be handed to DataLoader worker
    processes and Ray workers. Remote videos are copied once into `cache` (a node-local
    `FileCache`); local ones are decoded in place.

    Images are float32 [3, H, W] in [0, 1] by default, what the model and every other caller
    takes. `image_dtype=torch.uint8` returns the decoded [3, H, W] frame itself instead: a
    quarter of the bytes through the loader's shared memory and the copy to the device, which
    scales it there (`x.float() / 255` gives exactly the float32 default).
    """

    def __init__(
        self,
        source: str | DatasetMeta,
        *,
        episodes: Sequence[int] | range | None = None,
        cameras: Sequence[str] | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        storage_options: Mapping[str, Any] | None = None,
        cache: FileCache | None = None,
        tolerance_s: float = layout.DEFAULT_TOLERANCE_S,
        image_dtype: torch.dtype = torch.float32,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be at least 1")
        if image_dtype not in (torch.float32, torch.uint8):
            raise ValueError(f"image_dtype={image_dtype} must be torch.float32 or torch.uint8")
        self.meta = (
            source
            if isinstance(source, DatasetMeta)
            else load_meta(source, storage_options=storage_options)
        )
        if cameras is None:
            self.camera_keys = list(self.meta.camera_keys)
        else:
            check_cameras(self.meta, cameras)
            self.camera_keys = [camera_key(c) for c in cameras]
        self.frames: FrameTable = load_frames(self.meta, episodes)
        self.chunk_size = chunk_size
        self.tolerance_s = tolerance_s
        self.image_dtype = image_dtype
        self.cache = cache or FileCache()
        self._pool: VideoPool | None = None
        self._pool_pid = -1

    def __len__(self) -> int:
        return len(self.frames)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_pool"] = None  # open decoders belong to the process that opened them
        return state

    def __getitem__(self, row: int) -> dict[str, Any]:
        f = self.frames
        if not 0 <= row < len(f):
            raise IndexError(f"row {row} is out of range for {len(f)} frames")
        steps = row + np.arange(self.chunk_size)
        end = f.episode_end[row]
        sample: dict[str, Any] = {
            OBS_STATE: torch.from_numpy(f.state[row].copy()),
            ACTION: torch.from_numpy(f.action[np.minimum(steps, end - 1)]),
            "action_is_pad": torch.from_numpy(steps >= end),
            "task": self.meta.tasks[f.task_index[row]],
            "index": torch.tensor(f.index[row]),
            "episode_index": torch.tensor(f.episode_index[row]),
            "frame_index": torch.tensor(f.frame_index[row]),
            "timestamp": torch.tensor(f.timestamp[row], dtype=torch.float32),
        }
        for key in self.camera_keys:
            sample[key] = self.image(row, key)
        return sample

    def image(self, row: int, key: str) -> torch.Tensor:
        """The [3, H, W] frame of camera `key` at row `row`: float32 in [0, 1], or the uint8
        frame as decoded (`image_dtype`)."""
        episode = int(self.frames.episode_index[row])
        ref = self.meta.episodes[episode].videos[key]
        t = ref.from_timestamp + float(self.frames.timestamp[row])
        context = f"episode {episode}, camera {key}, t={float(self.frames.timestamp[row]):.6f}s"
        video = self._video(ref.file)
        frame = video.frames_at([t], tolerance_s=self.tolerance_s, context=context)[0]
        image = torch.from_numpy(frame).permute(2, 0, 1)
        return image if self.image_dtype == torch.uint8 else image.float().div_(255.0)

    def _video(self, relative: str):
        # A forked DataLoader worker inherits the parent's open decoders, whose threads did
        # not survive the fork: each process opens its own, and the inherited ones are never
        # touched again (closing them would wait forever on those threads).
        if self._pool is None or self._pool_pid != os.getpid():
            if self._pool is not None:
                _INHERITED_POOLS.append(self._pool)
            self._pool, self._pool_pid = VideoPool(), os.getpid()
        storage = self.meta.storage
        name = storage.display(relative)
        if storage.is_local:
            path: Path | str = storage.path(relative)
        else:
            path = self.cache.local_path(storage, relative)
        return self._pool.get(path, name=name)


def collate_samples(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack samples into a batch: tensors gain a batch dim, `task` becomes a list of str."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    batch: dict[str, Any] = {}
    for key, value in samples[0].items():
        values = [s[key] for s in samples]
        batch[key] = torch.stack(values) if isinstance(value, torch.Tensor) else list(values)
    return batch
