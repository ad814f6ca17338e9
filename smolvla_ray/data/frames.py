"""The frame table of the selected episodes: indices, timestamps, state, action, task.

All low-dimensional columns of the selected episodes are loaded once into numpy arrays
(a million frames of 32-dim state and action is ~250 MB, small next to video), so building
a sample is pure indexing and needs no parquet access in the loader workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from smolvla_ray.data import layout
from smolvla_ray.data.meta import DatasetMeta, read_parquet, select_episodes
from smolvla_ray.keys import ACTION, OBS_STATE

_COLUMNS = ("index", "episode_index", "frame_index", "timestamp", "task_index")


@dataclass(frozen=True)
class FrameTable:
    """Rows of the selected episodes, in selection order; row = position in the selection."""

    episodes: tuple[int, ...]
    index: np.ndarray  # int64 [N], LeRobot's global frame index
    episode_index: np.ndarray  # int64 [N]
    frame_index: np.ndarray  # int64 [N]
    timestamp: np.ndarray  # float64 [N], seconds from the episode start
    task_index: np.ndarray  # int64 [N]
    state: np.ndarray  # float32 [N, state_dim]
    action: np.ndarray  # float32 [N, action_dim]
    episode_start: np.ndarray  # int64 [N], row of the episode's first frame
    episode_end: np.ndarray  # int64 [N], row after the episode's last frame

    def __len__(self) -> int:
        return len(self.index)


def load_frames(meta: DatasetMeta, episodes: Sequence[int] | range | None = None) -> FrameTable:
    """Read the frame rows of `episodes` (None = all) from the data parquet files."""
    chosen = select_episodes(meta, episodes)
    for key in (OBS_STATE, ACTION):
        if key not in meta.features:
            raise ValueError(
                f"{meta.storage.display(layout.INFO_PATH)} has no feature {key!r}; "
                "SmolVLA training needs observation.state and action"
            )
    by_file: dict[str, list[int]] = {}
    for e in chosen:
        by_file.setdefault(meta.episodes[e].data_file, []).append(e)
    per_episode: dict[int, dict[str, np.ndarray]] = {}
    columns = [*_COLUMNS, OBS_STATE, ACTION]
    for relative, wanted in by_file.items():
        try:
            table = read_parquet(meta.storage, relative, columns)
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"{meta.storage.display(relative)} does not exist (data of episodes {wanted})"
            ) from err
        except ValueError as err:
            if "No match for FieldRef" in str(err) or "not in schema" in str(err):
                raise ValueError(
                    f"{meta.storage.display(relative)} lacks a required column; it needs "
                    f"{columns} ({err})"
                ) from err
            raise
        table = table.filter(pc.is_in(table.column("episode_index"), pa.array(wanted)))
        episode_col = table.column("episode_index").to_numpy()
        for e in wanted:
            rows = np.flatnonzero(episode_col == e)
            part = {name: _to_numpy(table.column(name).take(rows)) for name in columns}
            order = np.argsort(part["frame_index"], kind="stable")
            part = {name: values[order] for name, values in part.items()}
            _check_episode(meta, relative, e, part)
            per_episode[e] = part
    parts = [per_episode[e] for e in chosen]
    lengths = np.array([len(p["index"]) for p in parts], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return FrameTable(
        episodes=tuple(chosen),
        index=np.concatenate([p["index"] for p in parts]).astype(np.int64),
        episode_index=np.concatenate([p["episode_index"] for p in parts]).astype(np.int64),
        frame_index=np.concatenate([p["frame_index"] for p in parts]).astype(np.int64),
        timestamp=np.concatenate([p["timestamp"] for p in parts]).astype(np.float64),
        task_index=np.concatenate([p["task_index"] for p in parts]).astype(np.int64),
        state=np.concatenate([p[OBS_STATE] for p in parts]).astype(np.float32),
        action=np.concatenate([p[ACTION] for p in parts]).astype(np.float32),
        episode_start=np.repeat(starts, lengths),
        episode_end=np.repeat(starts + lengths, lengths),
    )


def _to_numpy(column: pa.ChunkedArray) -> np.ndarray:
    array = column.combine_chunks()
    if pa.types.is_fixed_size_list(array.type) or pa.types.is_list(array.type):
        values = array.flatten().to_numpy(zero_copy_only=False)
        return values.reshape(len(array), -1) if len(array) else values.reshape(0, 0)
    return array.to_numpy(zero_copy_only=False)


def _check_episode(
    meta: DatasetMeta, relative: str, episode: int, part: dict[str, np.ndarray]
) -> None:
    """An episode's rows must be complete: LeRobot indexes frames by these invariants."""
    where = meta.storage.display(relative)
    expected = meta.episodes[episode].length
    found = len(part["index"])
    if found != expected:
        raise ValueError(
            f"{where}: episode {episode} has {found} frames, the episode metadata says {expected}"
        )
    if not np.array_equal(part["frame_index"], np.arange(found)):
        raise ValueError(f"{where}: episode {episode} frame_index is not 0..{found - 1}")
    start = meta.episodes[episode].dataset_from_index
    if not np.array_equal(part["index"], np.arange(start, start + found)):
        raise ValueError(
            f"{where}: episode {episode} index column is not {start}..{start + found - 1}"
        )
