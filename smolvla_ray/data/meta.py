"""Dataset metadata of the LeRobotDataset v3.0 and v2.1 layouts, from any fsspec URL.

Both layouts are read into one model (`DatasetMeta` with an `EpisodeMeta` per episode that
says where its frames and video segments are), so everything downstream is layout-free.
Every malformed input fails here, before any training starts, with the file and key named.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq

from smolvla_ray.data import layout
from smolvla_ray.data.stats import Stats, aggregate_stats, from_jsonable
from smolvla_ray.data.storage import Storage
from smolvla_ray.keys import camera_key
from smolvla_ray.storage import StorageUnavailableError


@dataclass(frozen=True)
class VideoRef:
    """Where one camera's frames of one episode are: a file and the episode's start in it."""

    file: str  # relative to the dataset root
    from_timestamp: float


@dataclass(frozen=True)
class EpisodeMeta:
    """One episode: its length, tasks, data file and first global frame index, videos."""

    episode_index: int
    length: int
    tasks: tuple[str, ...]
    data_file: str
    dataset_from_index: int
    videos: Mapping[str, VideoRef] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetMeta:
    """Everything about a dataset except the frames themselves."""

    storage: Storage
    version: str
    info: Mapping[str, Any]
    stats: Mapping[str, Stats]
    tasks: tuple[str, ...]  # position = task_index
    episodes: tuple[EpisodeMeta, ...]  # position = episode_index

    @property
    def fps(self) -> int:
        """Frames per second of every episode and video."""
        return int(self.info["fps"])

    @property
    def features(self) -> Mapping[str, Mapping[str, Any]]:
        """`info.json` features: key -> dtype, shape, names (and `info` for videos)."""
        return self.info["features"]

    @property
    def camera_keys(self) -> list[str]:
        """Video feature keys, e.g. `observation.images.top`."""
        return [k for k, ft in self.features.items() if ft.get("dtype") == "video"]

    @property
    def total_frames(self) -> int:
        """Number of frames over all episodes."""
        return sum(ep.length for ep in self.episodes)

    def feature_dim(self, key: str) -> int:
        """Size of a 1-D feature such as `observation.state` or `action`."""
        if key not in self.features:
            raise KeyError(f"feature {key!r} is not in {self.storage.display(layout.INFO_PATH)}")
        return int(self.features[key]["shape"][0])


def load_meta(url: str, *, storage_options: Mapping[str, Any] | None = None) -> DatasetMeta:
    """Read `meta/` of the dataset at `url` (v3.0 or v2.1); fail clearly on bad input.

    Raises FileNotFoundError for a missing file, ValueError for malformed content or an
    unsupported `codebase_version`, StorageUnavailableError when storage cannot be reached.
    """
    storage = Storage(url, dict(storage_options or {}))
    info = _load_info(storage)
    version = info["codebase_version"]
    if version == "v3.0":
        tasks = _load_tasks_v30(storage)
        episodes = _load_episodes_v30(storage, info)
    else:
        tasks = _load_tasks_v21(storage)
        episodes = _load_episodes_v21(storage, info)
    stats = _load_stats(storage, version)
    expected = info.get("total_episodes")
    if expected is not None and expected != len(episodes):
        raise ValueError(
            f"{storage.display(layout.INFO_PATH)} says total_episodes={expected} but the "
            f"episode metadata lists {len(episodes)}; the dataset is incomplete"
        )
    return DatasetMeta(storage, version, info, stats, tasks, tuple(episodes))


def check_cameras(meta: DatasetMeta, required_keys: Iterable[str]) -> None:
    """Raise ValueError naming each camera the policy needs that the dataset lacks."""
    required = [camera_key(k) for k in required_keys]
    missing = [k for k in required if k not in meta.camera_keys]
    if missing:
        raise ValueError(
            f"dataset {meta.storage.url} lacks camera(s) {missing}; it has {meta.camera_keys}. "
            "Choose cameras the dataset has (data.cameras), or map the dataset's cameras to a "
            "pretrained policy's with data.rename_map"
        )


def select_episodes(meta: DatasetMeta, episodes: Sequence[int] | range | None = None) -> list[int]:
    """Validate an episode selection (indices or a range; None = all), keeping its order."""
    if episodes is None:
        return list(range(len(meta.episodes)))
    chosen = [int(e) for e in episodes]
    bad = [e for e in chosen if not 0 <= e < len(meta.episodes)]
    if bad:
        raise ValueError(
            f"episodes {bad} are out of range: {meta.storage.url} has episodes "
            f"0..{len(meta.episodes) - 1}"
        )
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"episode selection {chosen} lists an episode twice")
    if not chosen:
        raise ValueError("episode selection is empty; list at least one episode")
    return chosen


def check_readable(
    meta: DatasetMeta, episodes: Sequence[int], *, needs_stats: Iterable[str], sample: int = 8
) -> None:
    """What a run would otherwise find out on its workers, checked before it starts: the
    statistics the policy normalizes with, and the parquet footers of up to `sample` data
    files the run reads (first, last, and evenly between: a truncated or half-copied file
    fails here, naming itself). Raises ValueError."""
    missing = [k for k in needs_stats if k not in meta.stats]
    if missing:
        raise ValueError(
            f"{meta.storage.display(layout.STATS_PATH)} has no statistics for {missing}: the "
            "policy normalizes them with the dataset's mean and std. Recompute the dataset's "
            "meta/stats.json (LeRobot's compute_stats), or copy it with the dataset"
        )
    files = list(dict.fromkeys(meta.episodes[i].data_file for i in episodes))
    if len(files) > sample:
        step = (len(files) - 1) / (sample - 1)
        files = [files[round(i * step)] for i in range(sample)]
    for relative in files:
        try:
            with meta.storage.fs.open(meta.storage.path(relative), "rb") as f:
                pq.read_metadata(f)
        except FileNotFoundError:
            raise ValueError(f"{meta.storage.display(relative)} is missing") from None
        except (OSError, ValueError) as err:
            if isinstance(err, StorageUnavailableError):
                raise
            raise ValueError(
                f"{meta.storage.display(relative)} is not a readable parquet file ({err}); "
                "the dataset is truncated or corrupt: copy it again"
            ) from None


def read_json(storage: Storage, relative: str) -> Any:
    """Parse a JSON file of the dataset; malformed JSON is a ValueError naming the file."""
    raw = storage.read_bytes(relative)
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{storage.display(relative)} is not valid JSON: {err}") from err


def read_parquet(storage: Storage, relative: str, columns: list[str] | None = None):
    """Read a parquet file of the dataset (a pyarrow Table); corrupt files name themselves."""
    raw = storage.read_bytes(relative)
    try:
        return pq.read_table(io.BytesIO(raw), columns=columns)
    except Exception as err:
        where = storage.display(relative)
        raise ValueError(f"{where} is not a readable parquet file: {err}") from err


def _load_info(storage: Storage) -> dict[str, Any]:
    where = storage.display(layout.INFO_PATH)
    try:
        info = read_json(storage, layout.INFO_PATH)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{where} does not exist: {storage.url} is not a LeRobot dataset "
            "(expected meta/info.json under the dataset root)"
        ) from err
    if not isinstance(info, dict):
        raise ValueError(f"{where} must hold a JSON object, got {type(info).__name__}")
    for key in ("codebase_version", "fps", "features"):
        if key not in info:
            raise ValueError(f"{where} has no {key!r}; it is not a LeRobot dataset info file")
    version = info["codebase_version"]
    if version not in layout.SUPPORTED_VERSIONS:
        raise ValueError(
            f"{where}: codebase_version={version!r} is not supported; supported versions are "
            f"{list(layout.SUPPORTED_VERSIONS)} (convert older datasets with LeRobot's "
            "conversion scripts)"
        )
    if not isinstance(info["fps"], int | float) or info["fps"] <= 0:
        raise ValueError(f"{where}: fps={info['fps']!r} must be a positive number")
    if not isinstance(info["features"], dict):
        raise ValueError(f"{where}: 'features' must be an object")
    for key, ft in info["features"].items():
        if not isinstance(ft, dict) or "dtype" not in ft or "shape" not in ft:
            raise ValueError(f"{where}: feature {key!r} needs 'dtype' and 'shape'")
    return info


def _load_tasks_v30(storage: Storage) -> tuple[str, ...]:
    table = read_parquet(storage, layout.V30_TASKS_PATH)
    names = table.column_names
    # pandas writes the task strings as the index: a "task" column or "__index_level_0__".
    text_col = next((c for c in ("task", "__index_level_0__") if c in names), None)
    if text_col is None or "task_index" not in names:
        raise ValueError(
            f"{storage.display(layout.V30_TASKS_PATH)} needs a task string index and a "
            f"'task_index' column; found columns {names}"
        )
    indices = table.column("task_index").to_pylist()
    pairs = sorted(zip(indices, table.column(text_col).to_pylist(), strict=True))
    return _dense_tasks(storage, layout.V30_TASKS_PATH, pairs)


def _load_tasks_v21(storage: Storage) -> tuple[str, ...]:
    rows = _read_jsonl(storage, layout.V21_TASKS_PATH)
    try:
        pairs = sorted((int(r["task_index"]), str(r["task"])) for r in rows)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"{storage.display(layout.V21_TASKS_PATH)}: every line needs task_index and task "
            f"({err})"
        ) from err
    return _dense_tasks(storage, layout.V21_TASKS_PATH, pairs)


def _dense_tasks(storage: Storage, relative: str, pairs: list[tuple[int, str]]) -> tuple[str, ...]:
    if [i for i, _ in pairs] != list(range(len(pairs))):
        raise ValueError(f"{storage.display(relative)}: task_index values must be 0..N-1")
    return tuple(t for _, t in pairs)


def _load_episodes_v30(storage: Storage, info: Mapping[str, Any]) -> list[EpisodeMeta]:
    pattern = storage.path(layout.V30_EPISODES_DIR) + "/*/*.parquet"
    files = sorted(storage.fs.glob(pattern))
    if not files:
        raise FileNotFoundError(
            f"{storage.display(layout.V30_EPISODES_DIR)} holds no episode parquet files "
            "(expected meta/episodes/chunk-XXX/file-XXX.parquet)"
        )
    data_template = info.get("data_path") or layout.V30_DATA_PATH
    video_template = info.get("video_path") or layout.V30_VIDEO_PATH
    cameras = [k for k, ft in info["features"].items() if ft.get("dtype") == "video"]
    episodes: list[EpisodeMeta] = []
    for path in files:
        relative = path[len(storage.root) + 1 :]
        schema_names = pq.read_schema(io.BytesIO(storage.read_bytes(relative))).names
        columns = [c for c in schema_names if not c.startswith("stats/")]
        for row in read_parquet(storage, relative, columns).to_pylist():
            try:
                videos = {
                    cam: VideoRef(
                        video_template.format(
                            video_key=cam,
                            chunk_index=row[f"videos/{cam}/chunk_index"],
                            file_index=row[f"videos/{cam}/file_index"],
                        ),
                        float(row[f"videos/{cam}/from_timestamp"]),
                    )
                    for cam in cameras
                }
                length = int(row["dataset_to_index"]) - int(row["dataset_from_index"])
                episodes.append(
                    EpisodeMeta(
                        episode_index=int(row["episode_index"]),
                        length=int(row.get("length") or length),
                        tasks=tuple(row.get("tasks") or ()),
                        data_file=data_template.format(
                            chunk_index=row["data/chunk_index"], file_index=row["data/file_index"]
                        ),
                        dataset_from_index=int(row["dataset_from_index"]),
                        videos=videos,
                    )
                )
            except KeyError as err:
                raise ValueError(
                    f"{storage.display(relative)}: episode row lacks column {err.args[0]!r}"
                ) from err
    episodes.sort(key=lambda ep: ep.episode_index)
    _check_dense(storage, layout.V30_EPISODES_DIR, episodes)
    return episodes


def _load_episodes_v21(storage: Storage, info: Mapping[str, Any]) -> list[EpisodeMeta]:
    rows = _read_jsonl(storage, layout.V21_EPISODES_PATH)
    chunks_size = int(info.get("chunks_size") or layout.DEFAULT_CHUNKS_SIZE)
    data_template = info.get("data_path") or layout.V21_DATA_PATH
    video_template = info.get("video_path") or layout.V21_VIDEO_PATH
    cameras = [k for k, ft in info["features"].items() if ft.get("dtype") == "video"]
    try:
        rows = sorted(rows, key=lambda r: int(r["episode_index"]))
        episodes, start = [], 0
        for row in rows:
            index, length = int(row["episode_index"]), int(row["length"])
            chunk = index // chunks_size
            videos = {
                cam: VideoRef(
                    video_template.format(episode_chunk=chunk, video_key=cam, episode_index=index),
                    0.0,
                )
                for cam in cameras
            }
            data_file = data_template.format(episode_chunk=chunk, episode_index=index)
            tasks = tuple(row.get("tasks") or ())
            episodes.append(EpisodeMeta(index, length, tasks, data_file, start, videos))
            start += length
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"{storage.display(layout.V21_EPISODES_PATH)}: every line needs episode_index and "
            f"length ({err})"
        ) from err
    _check_dense(storage, layout.V21_EPISODES_PATH, episodes)
    return episodes


def _check_dense(storage: Storage, relative: str, episodes: list[EpisodeMeta]) -> None:
    if [ep.episode_index for ep in episodes] != list(range(len(episodes))):
        raise ValueError(f"{storage.display(relative)}: episode_index values must be 0..N-1")


def _load_stats(storage: Storage, version: str) -> dict[str, Stats]:
    if storage.exists(layout.STATS_PATH):
        raw = read_json(storage, layout.STATS_PATH)
        if not isinstance(raw, dict):
            raise ValueError(f"{storage.display(layout.STATS_PATH)} must hold a JSON object")
        return from_jsonable(raw)
    if version == "v2.1" and storage.exists(layout.V21_EPISODES_STATS_PATH):
        per_episode = [
            from_jsonable(r["stats"]) for r in _read_jsonl(storage, layout.V21_EPISODES_STATS_PATH)
        ]
        keys = set.intersection(*(set(s) for s in per_episode)) if per_episode else set()
        return {k: aggregate_stats([s[k] for s in per_episode]) for k in sorted(keys)}
    return {}


def _read_jsonl(storage: Storage, relative: str) -> list[dict[str, Any]]:
    text = storage.read_bytes(relative).decode("utf-8", errors="replace")
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{storage.display(relative)} line {number}: {err}") from err
    return rows
