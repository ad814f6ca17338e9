"""Write in-memory episodes as a LeRobotDataset (v3.0 or v2.1) with real mp4 videos.

Used by the synthetic demo dataset; kept separate from it so the file layout (which LeRobot
0.6.1 must load unchanged) lives in one place. Videos are encoded like LeRobot's default:
libsvtav1, crf 30, a keyframe every 2 frames, yuv420p, through PyAV's bundled FFmpeg.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from smolvla_ray.data import layout
from smolvla_ray.data.stats import Stats, aggregate_stats, image_stats, to_jsonable, vector_stats
from smolvla_ray.data.storage import Storage
from smolvla_ray.keys import ACTION, OBS_STATE

Codec = Literal["av1", "h264", "hevc"]
GOP_SIZE = 2
CRF = 30
# Encoder candidates per codec, first available wins; options as LeRobot passes them.
_ENCODERS: dict[str, list[tuple[str, dict[str, str]]]] = {
    "av1": [
        ("libsvtav1", {"g": str(GOP_SIZE), "crf": str(CRF), "preset": "12"}),
        ("libaom-av1", {"g": str(GOP_SIZE), "crf": str(CRF), "cpu-used": "8"}),
    ],
    "h264": [("libx264", {"g": str(GOP_SIZE), "crf": str(CRF)})],
    "hevc": [("libx265", {"g": str(GOP_SIZE), "crf": str(CRF), "x265-params": "log-level=1"})],
}


@dataclass(frozen=True)
class EpisodeData:
    """One episode to write: a task, float32 state/action [L, D], uint8 frames per camera key."""

    task: str
    state: np.ndarray
    action: np.ndarray
    frames: dict[str, np.ndarray]


def select_encoder(codec: Codec) -> tuple[str, dict[str, str]]:
    """The PyAV encoder for `codec`, or a ValueError that says which codec to use instead."""
    import av

    if codec not in _ENCODERS:
        raise ValueError(f"codec={codec!r} is not supported; use 'av1' or 'h264'")
    for name, options in _ENCODERS[codec]:
        with contextlib.suppress(Exception):
            av.codec.Codec(name, "w")
            return name, dict(options)
    tried = ", ".join(name for name, _ in _ENCODERS[codec])
    raise ValueError(
        f"this PyAV build has no encoder for codec={codec!r} (tried {tried}); "
        "use codec='h264' or install a PyAV wheel with libsvtav1"
    )


class Mp4Writer:
    """Appends uint8 [N, H, W, 3] frames to one mp4 at a constant frame rate.

    Frame i gets pts i in a 1/fps time base, so frame i is at exactly i / fps seconds;
    LeRobot finds frames by timestamp, so a constant rate is part of the format.
    """

    def __init__(self, path: Path, *, fps: int, codec: Codec, height: int, width: int) -> None:
        import av

        encoder, options = select_encoder(codec)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.num_frames = 0
        self._container = av.open(str(path), "w")
        self._stream = self._container.add_stream(encoder, rate=fps, options=options)
        self._stream.pix_fmt = "yuv420p"
        self._stream.width = width
        self._stream.height = height
        self._time_base = Fraction(1, fps)
        self._stream.codec_context.time_base = self._time_base

    def write(self, frames: np.ndarray) -> None:
        """Encode frames after the ones already written."""
        import av

        for image in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts = self.num_frames
            frame.time_base = self._time_base
            self._container.mux(self._stream.encode(frame))
            self.num_frames += 1

    def close(self) -> None:
        """Flush the encoder and finish the file."""
        self._container.mux(self._stream.encode(None))
        self._container.close()


def write_dataset(
    out: str,
    episodes: Iterable[EpisodeData],
    *,
    format: layout.CodebaseVersion,
    fps: int,
    codec: Codec,
    state_names: list[str] | None = None,
    robot_type: str | None = None,
    storage_options: dict | None = None,
) -> None:
    """Write `episodes` to `out` (a local directory or fsspec URL) in the given layout.

    Remote targets are written to a local staging directory first and uploaded at the end,
    so a failed write never leaves a half dataset with a valid `info.json` behind.
    """
    storage = Storage(out, storage_options or {})
    if storage.exists(layout.INFO_PATH):
        raise FileExistsError(
            f"{storage.display(layout.INFO_PATH)} already exists; write the dataset to a new "
            "directory or delete the old one first"
        )
    os.environ.setdefault("SVT_LOG", "1")  # libsvtav1 prints its config banner otherwise
    if storage.is_local:
        _write_local(Path(storage.root), episodes, format, fps, codec, state_names, robot_type)
        return
    with tempfile.TemporaryDirectory(prefix="smolvla-ray-dataset-") as tmp:
        _write_local(Path(tmp), episodes, format, fps, codec, state_names, robot_type)
        storage.fs.put(f"{tmp}/", storage.root, recursive=True)


def _write_local(
    root: Path,
    episodes: Iterable[EpisodeData],
    format: layout.CodebaseVersion,
    fps: int,
    codec: Codec,
    state_names: list[str] | None,
    robot_type: str | None,
) -> None:
    root.mkdir(parents=True, exist_ok=True)
    state = _EpisodeCounter()
    if format == "v3.0":
        rows, first = _write_v30_files(root, _counted(episodes, state), fps, codec)
    else:
        rows, first = _write_v21_files(root, _counted(episodes, state), fps, codec)
    if first is None:
        raise ValueError("no episodes to write")
    features = _features(first, fps, codec, state_names, v30=format == "v3.0")
    stats = {key: aggregate_stats([r["stats"][key] for r in rows]) for key in rows[0]["stats"]}
    _write_json(root / layout.STATS_PATH, to_jsonable(stats))
    info: dict[str, Any] = {
        "codebase_version": format,
        "robot_type": robot_type,
        "total_episodes": len(rows),
        "total_frames": state.num_frames,
        "total_tasks": len(state.tasks),
        "chunks_size": layout.DEFAULT_CHUNKS_SIZE,
        "fps": fps,
        "splits": {"train": f"0:{len(rows)}"},
        "features": features,
    }
    if format == "v3.0":
        info |= {
            "data_files_size_in_mb": 100,
            "video_files_size_in_mb": 200,
            "data_path": layout.V30_DATA_PATH,
            "video_path": layout.V30_VIDEO_PATH,
        }
        _write_v30_meta(root, rows, state.tasks)
    else:
        info |= {
            "total_videos": len(rows) * len(first.frames),
            "total_chunks": (len(rows) - 1) // layout.DEFAULT_CHUNKS_SIZE + 1,
            "data_path": layout.V21_DATA_PATH,
            "video_path": layout.V21_VIDEO_PATH,
        }
        _write_v21_meta(root, rows, state.tasks)
    _write_json(root / layout.INFO_PATH, info)  # last: a dataset without info.json is invalid


class _EpisodeCounter:
    def __init__(self) -> None:
        self.num_frames = 0
        self.tasks: dict[str, int] = {}


def _counted(
    episodes: Iterable[EpisodeData], counter: _EpisodeCounter
) -> Iterator[tuple[int, int, int, EpisodeData]]:
    """Yield (episode_index, first global index, task_index, episode), validating shapes."""
    for episode_index, ep in enumerate(episodes):
        length = len(ep.state)
        if ep.action.shape[0] != length or any(f.shape[0] != length for f in ep.frames.values()):
            raise ValueError(f"episode {episode_index}: state, action and frames differ in length")
        task_index = counter.tasks.setdefault(ep.task, len(counter.tasks))
        yield episode_index, counter.num_frames, task_index, ep
        counter.num_frames += length


def _frame_table(ep: EpisodeData, episode_index: int, start: int, task_index: int, fps: int):
    length = len(ep.state)
    frame_index = np.arange(length, dtype=np.int64)
    columns = {
        OBS_STATE: _fixed_list(ep.state),
        ACTION: _fixed_list(ep.action),
        "timestamp": pa.array((frame_index / fps).astype(np.float32)),
        "frame_index": pa.array(frame_index),
        "episode_index": pa.array(np.full(length, episode_index, dtype=np.int64)),
        "index": pa.array(start + frame_index),
        "task_index": pa.array(np.full(length, task_index, dtype=np.int64)),
    }
    table = pa.table(columns)
    stats: dict[str, Stats] = {
        name: vector_stats(np.asarray(_column_numpy(table, name)))
        for name in (OBS_STATE, ACTION, *layout.INDEX_FEATURES)
    }
    for key, frames in ep.frames.items():
        stats[key] = image_stats(frames)
    return table, stats


def _column_numpy(table: pa.Table, name: str) -> np.ndarray:
    column = table.column(name).combine_chunks()
    if pa.types.is_fixed_size_list(column.type):
        return column.flatten().to_numpy().reshape(len(column), column.type.list_size)
    return column.to_numpy()


def _fixed_list(values: np.ndarray) -> pa.FixedSizeListArray:
    values = np.ascontiguousarray(values, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


class Mp4Concatenator:
    """Appends whole mp4 files to one mp4 without re-encoding (a stream copy).

    LeRobot records each episode to its own mp4 and concatenates them the same way, so the
    frames of an episode are bit-identical in the v3.0 file and in the v2.1 per-episode file.
    """

    def __init__(self, path: Path, *, fps: int) -> None:
        self.path = path
        self.fps = fps
        self.num_frames = 0
        self._container = None
        self._stream = None

    def append(self, episode_video: Path) -> None:
        """Copy every packet of `episode_video`, shifted to start after what is there."""
        import av

        if self._container is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._container = av.open(str(self.path), "w")
        with av.open(str(episode_video)) as source:
            stream = source.streams.video[0]
            if self._stream is None:
                self._stream = self._container.add_stream_from_template(stream, opaque=True)
            offset = round(Fraction(self.num_frames, self.fps) / stream.time_base)
            for packet in source.demux(stream):
                if packet.dts is None:  # the demuxer's end-of-stream marker
                    continue
                packet.pts += offset
                packet.dts += offset
                packet.stream = self._stream
                self._container.mux(packet)
            self.num_frames += stream.frames

    def close(self) -> None:
        """Finish the file."""
        if self._container is not None:
            self._container.close()


def _write_v30_files(root: Path, episodes, fps: int, codec: Codec):
    rows: list[dict[str, Any]] = []
    first: EpisodeData | None = None
    videos: dict[str, Mp4Concatenator] = {}
    writer: pq.ParquetWriter | None = None
    data_path = root / layout.V30_DATA_PATH.format(chunk_index=0, file_index=0)
    data_path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".episode-videos-", dir=root))
    try:
        for episode_index, start, task_index, ep in episodes:
            first = first or ep
            table, stats = _frame_table(ep, episode_index, start, task_index, fps)
            writer = writer or pq.ParquetWriter(str(data_path), table.schema, compression="snappy")
            writer.write_table(table)  # one row group per episode, as LeRobot writes
            row: dict[str, Any] = {
                "episode_index": episode_index,
                "tasks": [ep.task],
                "length": len(ep.state),
                "data/chunk_index": 0,
                "data/file_index": 0,
                "dataset_from_index": start,
                "dataset_to_index": start + len(ep.state),
            }
            for key, frames in ep.frames.items():
                if key not in videos:
                    path = root / layout.V30_VIDEO_PATH.format(
                        video_key=key, chunk_index=0, file_index=0
                    )
                    videos[key] = Mp4Concatenator(path, fps=fps)
                episode_video = staging / f"{key}.mp4"
                height, width = frames.shape[1:3]
                video = Mp4Writer(episode_video, fps=fps, codec=codec, height=height, width=width)
                try:
                    video.write(frames)
                finally:
                    video.close()
                from_ts = videos[key].num_frames / fps
                videos[key].append(episode_video)
                row |= {
                    f"videos/{key}/chunk_index": 0,
                    f"videos/{key}/file_index": 0,
                    f"videos/{key}/from_timestamp": from_ts,
                    f"videos/{key}/to_timestamp": videos[key].num_frames / fps,
                }
            row |= {"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0}
            row["stats"] = stats
            rows.append(row)
    finally:
        if writer is not None:
            writer.close()
        for concat in videos.values():
            concat.close()
        shutil.rmtree(staging, ignore_errors=True)
    return rows, first


def _write_v21_files(root: Path, episodes, fps: int, codec: Codec):
    rows: list[dict[str, Any]] = []
    first: EpisodeData | None = None
    for episode_index, start, task_index, ep in episodes:
        first = first or ep
        chunk = episode_index // layout.DEFAULT_CHUNKS_SIZE
        table, stats = _frame_table(ep, episode_index, start, task_index, fps)
        path = root / layout.V21_DATA_PATH.format(episode_chunk=chunk, episode_index=episode_index)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, str(path), compression="snappy")
        for key, frames in ep.frames.items():
            video_path = root / layout.V21_VIDEO_PATH.format(
                episode_chunk=chunk, video_key=key, episode_index=episode_index
            )
            height, width = frames.shape[1:3]
            video = Mp4Writer(video_path, fps=fps, codec=codec, height=height, width=width)
            try:
                video.write(frames)
            finally:
                video.close()
        rows.append(
            {"episode_index": episode_index, "tasks": [ep.task], "length": len(ep.state)}
            | {"stats": stats}
        )
    return rows, first


def _write_v30_meta(root: Path, rows: list[dict[str, Any]], tasks: dict[str, int]) -> None:
    flat = []
    for row in rows:
        entry = {k: v for k, v in row.items() if k != "stats"}
        for feature, stats in row["stats"].items():
            for name, value in stats.items():
                entry[f"stats/{feature}/{name}"] = np.asarray(value).tolist()
        flat.append(entry)
    path = root / layout.V30_EPISODES_PATH.format(chunk_index=0, file_index=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(flat), str(path))
    _write_tasks_parquet(root / layout.V30_TASKS_PATH, tasks)


def _write_tasks_parquet(path: Path, tasks: dict[str, int]) -> None:
    """`tasks.parquet` as pandas writes a frame indexed by task string (what LeRobot reads)."""
    ordered = sorted(tasks.items(), key=lambda item: item[1])
    table = pa.table(
        {
            "task_index": pa.array([i for _, i in ordered], pa.int64()),
            "task": pa.array([t for t, _ in ordered], pa.string()),
        }
    )
    pandas_meta = {
        "index_columns": ["task"],
        "column_indexes": [
            {
                "name": None,
                "field_name": None,
                "pandas_type": "unicode",
                "numpy_type": "object",
                "metadata": {"encoding": "UTF-8"},
            }
        ],
        "columns": [
            {
                "name": "task_index",
                "field_name": "task_index",
                "pandas_type": "int64",
                "numpy_type": "int64",
                "metadata": None,
            },
            {
                "name": "task",
                "field_name": "task",
                "pandas_type": "unicode",
                "numpy_type": "object",
                "metadata": None,
            },
        ],
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": "2.2.3",
    }
    table = table.replace_schema_metadata({"pandas": json.dumps(pandas_meta)})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, str(path))


def _write_v21_meta(root: Path, rows: list[dict[str, Any]], tasks: dict[str, int]) -> None:
    episodes = [{k: v for k, v in row.items() if k != "stats"} for row in rows]
    _write_jsonl(root / layout.V21_EPISODES_PATH, episodes)
    ordered = sorted(tasks.items(), key=lambda item: item[1])
    _write_jsonl(root / layout.V21_TASKS_PATH, [{"task_index": i, "task": t} for t, i in ordered])
    _write_jsonl(
        root / layout.V21_EPISODES_STATS_PATH,
        [{"episode_index": r["episode_index"], "stats": to_jsonable(r["stats"])} for r in rows],
    )


def _features(
    ep: EpisodeData, fps: int, codec: Codec, state_names: list[str] | None, *, v30: bool
) -> dict[str, dict]:
    names = state_names or [f"dim_{i}" for i in range(ep.state.shape[1])]
    action_names = (names + [f"dim_{i}" for i in range(len(names), ep.action.shape[1])])[
        : ep.action.shape[1]
    ]
    features: dict[str, dict] = {
        OBS_STATE: {"dtype": "float32", "shape": [ep.state.shape[1]], "names": names},
        ACTION: {
            "dtype": "float32",
            "shape": [ep.action.shape[1]],
            "names": action_names,
        },
    }
    for key, frames in ep.frames.items():
        height, width = frames.shape[1:3]
        features[key] = {
            "dtype": "video",
            "shape": [height, width, 3],
            "names": ["height", "width", "channels"],
            "info": {
                "video.height": height,
                "video.width": width,
                "video.codec": codec,
                "video.pix_fmt": "yuv420p",
                "video.is_depth_map": False,
                "video.fps": fps,
                "video.channels": 3,
                "video.g": GOP_SIZE,
                "video.crf": CRF,
                "has_audio": False,
            },
        }
    features |= {k: dict(v) for k, v in layout.INDEX_FEATURES.items()}
    if v30:
        for ft in features.values():
            if ft["dtype"] != "video":
                ft["fps"] = fps
    return features


def _write_json(path: Path, content: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=4))


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
