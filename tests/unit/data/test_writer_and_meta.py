"""The synthetic writer's output: layout, metadata LeRobot needs, stats, learnable content."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from smolvla_ray.data.frames import load_frames
from smolvla_ray.data.meta import check_cameras, load_meta, select_episodes
from smolvla_ray.data.synthetic import TASKS, write_demo_dataset

from .conftest import Demo


def test_v30_has_every_field_lerobot_requires(demo_v30: Demo) -> None:
    root = Path(demo_v30.root)
    info = json.loads((root / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0"
    assert isinstance(info["fps"], int)
    assert info["total_episodes"] == demo_v30.num_episodes
    assert info["total_frames"] == sum(demo_v30.lengths)
    assert info["total_tasks"] == 3
    for key in ("timestamp", "frame_index", "episode_index", "index", "task_index"):
        assert {"dtype", "shape", "names"} <= set(info["features"][key])
    top = info["features"]["observation.images.top"]
    assert top["dtype"] == "video" and top["shape"] == [96, 128, 3]
    assert top["names"] == ["height", "width", "channels"]
    assert top["info"]["video.codec"] == "av1"

    tasks = pq.read_table(root / "meta/tasks.parquet")
    assert tasks.column("task").to_pylist() == list(TASKS)
    assert tasks.column("task_index").to_pylist() == [0, 1, 2]
    # pandas (LeRobot's reader) must see the task strings as the index.
    pandas_meta = json.loads(tasks.schema.metadata[b"pandas"])
    assert pandas_meta["index_columns"] == ["task"]

    episodes = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [e["episode_index"] for e in episodes] == list(range(demo_v30.num_episodes))
    ends = np.cumsum(demo_v30.lengths)
    assert [e["dataset_to_index"] for e in episodes] == ends.tolist()
    assert [e["videos/observation.images.top/from_timestamp"] for e in episodes] == pytest.approx(
        (np.concatenate([[0], ends[:-1]]) / 30).tolist()
    )
    data = pq.read_table(root / "data/chunk-000/file-000.parquet")
    assert data.column("index").to_pylist() == list(range(sum(demo_v30.lengths)))
    row_groups = pq.ParquetFile(root / "data/chunk-000/file-000.parquet").num_row_groups
    assert row_groups == demo_v30.num_episodes  # one row group per episode, as LeRobot writes


def test_v21_layout(demo_v21: Demo) -> None:
    root = Path(demo_v21.root)
    info = json.loads((root / "meta/info.json").read_text())
    assert info["codebase_version"] == "v2.1"
    assert info["total_videos"] == 2 * demo_v21.num_episodes
    for e in range(demo_v21.num_episodes):
        assert (root / f"data/chunk-000/episode_{e:06d}.parquet").is_file()
        assert (root / f"videos/chunk-000/observation.images.wrist/episode_{e:06d}.mp4").is_file()
    lines = (root / "meta/episodes.jsonl").read_text().splitlines()
    assert [json.loads(x)["length"] for x in lines] == demo_v21.lengths


def test_stats_match_the_written_data(demo_v30: Demo) -> None:
    meta = load_meta(demo_v30.root)
    states = np.concatenate([demo_v30.episode(e).state for e in range(demo_v30.num_episodes)])
    stats = meta.stats["observation.state"]
    np.testing.assert_allclose(stats["mean"], states.mean(0), atol=1e-5)
    np.testing.assert_allclose(stats["std"], states.std(0), atol=1e-5)
    np.testing.assert_allclose(stats["min"], states.min(0), atol=1e-6)
    np.testing.assert_allclose(stats["max"], states.max(0), atol=1e-6)
    assert stats["count"].tolist() == [len(states)]
    image = meta.stats["observation.images.top"]
    assert image["mean"].shape == (3, 1, 1)
    assert np.all((image["min"] >= 0) & (image["max"] <= 1))
    for key in ("q01", "q50", "q99"):
        assert key in meta.stats["action"]


def test_v21_stats_equal_v30_stats(demo_v30: Demo, demo_v21: Demo) -> None:
    a, b = load_meta(demo_v30.root).stats, load_meta(demo_v21.root).stats
    assert a.keys() == b.keys()
    for key in a:
        for name in a[key]:
            np.testing.assert_array_equal(a[key][name], b[key][name])


def test_content_is_learnable_cube_follows_state(demo_v30: Demo) -> None:
    """The cube's centroid in the top camera tracks the state's (x, y)."""
    ep = demo_v30.episode(1)
    frames = ep.frames["observation.images.top"].astype(float)
    green = (frames[..., 1] > 150) & (frames[..., 0] < 120)
    ys, xs = np.indices(green.shape[1:])
    cx = (green * xs).sum((1, 2)) / green.sum((1, 2)) / (128 - 1)
    cy = (green * ys).sum((1, 2)) / green.sum((1, 2)) / (96 - 1)
    np.testing.assert_allclose(cx, ep.state[:, 0], atol=0.02)
    np.testing.assert_allclose(cy, ep.state[:, 1], atol=0.03)
    np.testing.assert_array_equal(ep.action[:-1], ep.state[1:])
    assert ep.task == TASKS[1] and ep.state[-1, 0] > ep.state[0, 0]  # pushed to the right


def test_both_layouts_read_the_same(demo_v30: Demo, demo_v21: Demo) -> None:
    a, b = load_meta(demo_v30.root), load_meta(demo_v21.root)
    assert (a.version, b.version) == ("v3.0", "v2.1")
    assert a.tasks == b.tasks == TASKS
    assert a.camera_keys == b.camera_keys == ["observation.images.top", "observation.images.wrist"]
    assert [e.length for e in a.episodes] == [e.length for e in b.episodes] == demo_v30.lengths
    assert [e.dataset_from_index for e in a.episodes] == [e.dataset_from_index for e in b.episodes]
    fa, fb = load_frames(a), load_frames(b)
    for name in ("index", "episode_index", "frame_index", "timestamp", "state", "action"):
        np.testing.assert_array_equal(getattr(fa, name), getattr(fb, name))


def test_episode_selection(demo_v30: Demo) -> None:
    meta = load_meta(demo_v30.root)
    frames = load_frames(meta, [3, 1])
    assert frames.episodes == (3, 1)
    assert np.unique(frames.episode_index).tolist() == [1, 3]
    assert frames.episode_index[0] == 3 and len(frames) == demo_v30.lengths[3] + demo_v30.lengths[1]
    assert load_frames(meta, range(1, 3)).episodes == (1, 2)
    with pytest.raises(ValueError, match=r"episodes \[7\] are out of range.*0\.\.4"):
        select_episodes(meta, [0, 7])
    with pytest.raises(ValueError, match="twice"):
        select_episodes(meta, [1, 1])


def test_check_cameras_names_the_missing_camera(demo_v30: Demo) -> None:
    meta = load_meta(demo_v30.root)
    check_cameras(meta, ["top", "observation.images.wrist"])
    with pytest.raises(ValueError, match=r"lacks camera\(s\) \['observation.images.side'\]"):
        check_cameras(meta, ["top", "side"])


def test_writer_refuses_to_overwrite_and_bad_arguments(demo_v30: Demo, tmp_path: Path) -> None:
    with pytest.raises(FileExistsError, match="info.json already exists"):
        write_demo_dataset(demo_v30.root)
    with pytest.raises(ValueError, match="format='v1.6'"):
        write_demo_dataset(str(tmp_path / "x"), format="v1.6")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="codec='vp9'"):
        write_demo_dataset(str(tmp_path / "y"), codec="vp9", num_episodes=1)  # type: ignore[arg-type]


def test_memory_url_round_trip() -> None:
    """Any fsspec URL is storage: write to and read from memory://."""
    url = f"memory://smolvla-ray-tests/{uuid.uuid4().hex}"
    write_demo_dataset(url, num_episodes=2, episode_length=9, cameras=("top",))
    meta = load_meta(url)
    assert meta.storage.is_local is False
    assert [e.length for e in meta.episodes] == [9, 2]
    assert len(load_frames(meta)) == 11
