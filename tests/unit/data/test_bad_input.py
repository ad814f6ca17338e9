"""Each bad input fails with a clear error naming the file or key, and breaks nothing else."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from smolvla_ray.data.frames import load_frames
from smolvla_ray.data.meta import load_meta
from smolvla_ray.data.samples import FrameDataset
from smolvla_ray.data.video import VideoDecodeError
from smolvla_ray.storage import StorageUnavailableError

from .conftest import Demo


@pytest.fixture
def v30_copy(demo_v30: Demo, tmp_path: Path) -> Path:
    root = tmp_path / "copy"
    shutil.copytree(demo_v30.root, root)
    return root


@pytest.fixture
def v21_copy(demo_v21: Demo, tmp_path: Path) -> Path:
    root = tmp_path / "copy21"
    shutil.copytree(demo_v21.root, root)
    return root


def test_missing_info_json(v30_copy: Path, demo_v30: Demo) -> None:
    (v30_copy / "meta/info.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"copy/meta/info.json does not exist.*LeRobot"):
        load_meta(str(v30_copy))
    assert load_meta(demo_v30.root).version == "v3.0"  # the original is untouched


def test_not_a_dataset_at_all(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="meta/info.json does not exist"):
        load_meta(str(tmp_path / "nowhere"))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", r"info.json is not valid JSON"),
        ("[1, 2]", r"info.json must hold a JSON object"),
        (json.dumps({"fps": 30, "features": {}}), r"info.json has no 'codebase_version'"),
        (
            json.dumps({"codebase_version": "v3.0", "fps": 0, "features": {}}),
            r"fps=0 must be a positive number",
        ),
        (
            json.dumps({"codebase_version": "v3.0", "fps": 30, "features": {"a": {}}}),
            r"feature 'a' needs 'dtype' and 'shape'",
        ),
    ],
)
def test_malformed_info_json(v30_copy: Path, content: str, message: str) -> None:
    (v30_copy / "meta/info.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        load_meta(str(v30_copy))


@pytest.mark.parametrize("version", ["v2.0", "v1.6", "v4.0"])
def test_unsupported_codebase_version(v30_copy: Path, version: str) -> None:
    info = json.loads((v30_copy / "meta/info.json").read_text())
    info["codebase_version"] = version
    (v30_copy / "meta/info.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=rf"codebase_version='{version}' is not supported.*v3.0"):
        load_meta(str(v30_copy))


def test_missing_camera(demo_v30: Demo) -> None:
    with pytest.raises(ValueError, match=r"lacks camera\(s\) \['observation.images.front'\]"):
        FrameDataset(demo_v30.root, cameras=["front"])


def test_missing_data_parquet_v30(v30_copy: Path) -> None:
    (v30_copy / "data/chunk-000/file-000.parquet").unlink()
    meta = load_meta(str(v30_copy))  # metadata alone is still fine
    with pytest.raises(FileNotFoundError, match=r"data/chunk-000/file-000.parquet does not exist"):
        load_frames(meta)


def test_missing_data_parquet_v21_other_episodes_still_load(v21_copy: Path) -> None:
    (v21_copy / "data/chunk-000/episode_000002.parquet").unlink()
    meta = load_meta(str(v21_copy))
    with pytest.raises(FileNotFoundError, match=r"episode_000002.parquet does not exist.*\[2\]"):
        load_frames(meta)
    assert load_frames(meta, [0, 1, 3]).episodes == (0, 1, 3)


def test_missing_episodes_metadata(v30_copy: Path) -> None:
    shutil.rmtree(v30_copy / "meta/episodes")
    with pytest.raises(FileNotFoundError, match="meta/episodes holds no episode parquet files"):
        load_meta(str(v30_copy))


def test_corrupt_parquet(v30_copy: Path) -> None:
    (v30_copy / "meta/tasks.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match=r"meta/tasks.parquet is not a readable parquet file"):
        load_meta(str(v30_copy))


def test_truncated_mp4(v21_copy: Path) -> None:
    video = v21_copy / "videos/chunk-000/observation.images.top/episode_000001.mp4"
    video.write_bytes(video.read_bytes()[: video.stat().st_size // 2])
    ds = FrameDataset(str(v21_copy))
    start = ds.meta.episodes[1].dataset_from_index
    with pytest.raises(VideoDecodeError, match=r"episode_000001.mp4 cannot be opened.*truncated"):
        ds[start]
    ds[0]  # other episodes' videos still decode
    ds[start + ds.meta.episodes[1].length]


def test_corrupt_mp4(v30_copy: Path) -> None:
    video = v30_copy / "videos/observation.images.wrist/chunk-000/file-000.mp4"
    video.write_bytes(b"\x00" * 64 + b"garbage" * 100)
    ds = FrameDataset(str(v30_copy))
    with pytest.raises(VideoDecodeError, match=r"observation.images.wrist/chunk-000/file-000.mp4"):
        ds[0]
    assert ds.image(0, "observation.images.top").shape == (3, 96, 128)  # other camera fine


def test_missing_mp4(v30_copy: Path) -> None:
    (v30_copy / "videos/observation.images.top/chunk-000/file-000.mp4").unlink()
    ds = FrameDataset(str(v30_copy))
    with pytest.raises(FileNotFoundError, match=r"observation.images.top/chunk-000/file-000.mp4"):
        ds[0]


def test_unreachable_storage_fails_fast() -> None:
    """An S3 endpoint that refuses connections: a clear error within seconds, not minutes."""
    options = {
        "key": "k",
        "secret": "s",
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "region_name": "us-east-1"},
    }
    start = time.monotonic()
    with pytest.raises(StorageUnavailableError, match=r"cannot reach storage.*127.0.0.1:9") as err:
        load_meta("s3://some-bucket/dataset", storage_options=options)
    assert time.monotonic() - start < 15
    assert "secret" not in str(err.value) and "'s'" not in str(err.value)  # no credentials
