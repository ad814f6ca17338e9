"""Names and path templates of the LeRobotDataset layouts (v3.0 and v2.1).

The writer and the reader both take their paths from here, so the two can never disagree
about where a file lives. The values match LeRobot 0.6.1 (`lerobot/datasets/utils.py`).
"""

from __future__ import annotations

from typing import Literal

CodebaseVersion = Literal["v3.0", "v2.1"]
SUPPORTED_VERSIONS: tuple[str, ...] = ("v3.0", "v2.1")

INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"

# v3.0: many episodes per data/video file, episode metadata as parquet.
V30_TASKS_PATH = "meta/tasks.parquet"
V30_EPISODES_DIR = "meta/episodes"
V30_EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V30_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V30_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"

# v2.1: one data file and one video per episode, metadata as JSON lines.
V21_EPISODES_PATH = "meta/episodes.jsonl"
V21_TASKS_PATH = "meta/tasks.jsonl"
V21_EPISODES_STATS_PATH = "meta/episodes_stats.jsonl"
V21_DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
V21_VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"

DEFAULT_CHUNKS_SIZE = 1000

# Columns every LeRobot frame table carries (each int64 [1] except timestamp, float32 [1]).
INDEX_FEATURES: dict[str, dict] = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}


# LeRobot's `tolerance_s`: a frame is "at" a timestamp when within this many seconds.
DEFAULT_TOLERANCE_S = 1e-4
