"""Decoded frames against the written frames; LeRobot-exact samples; v3.0 == v2.1."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from smolvla_ray.data.samples import FrameDataset, collate_samples
from smolvla_ray.data.synthetic import read_timecode
from smolvla_ray.data.video import FrameTimestampError, VideoFile

from .conftest import Demo, write_demo


def _frame_error(decoded: np.ndarray, written: np.ndarray) -> float:
    return float(np.abs(decoded.astype(float) - written.astype(float)).mean())


@pytest.fixture(scope="module", params=["av1", "h264", "hevc"])
def coded(request, tmp_path_factory: pytest.TempPathFactory) -> Demo:
    root = tmp_path_factory.mktemp(f"codec-{request.param}") / "demo"
    return write_demo(root, num_episodes=2, episode_length=30, codec=request.param)


def test_decoded_frames_match_written_frames(coded: Demo) -> None:
    """Every frame decodes within codec error, and is frame t, not t-1 or t+1."""
    video = VideoFile(Path(coded.root) / "videos/observation.images.top/chunk-000/file-000.mp4")
    start = 0
    for e in range(coded.num_episodes):
        written = coded.episode(e).frames["observation.images.top"]
        times = (start + np.arange(len(written))) / coded.fps
        for t in np.random.default_rng(e).permutation(len(written)):
            decoded = video.frames_at([times[t]])[0]
            error = _frame_error(decoded, written[t])
            assert error < 3.0, f"episode {e} frame {t}: mean abs error {error:.2f}/255"
            assert read_timecode(decoded) == t  # frame t itself, not a neighbour
        start += len(written)


def test_random_access_equals_sequential_decode(coded: Demo) -> None:
    path = Path(coded.root) / "videos/observation.images.wrist/chunk-000/file-000.mp4"
    total = sum(coded.lengths)
    times, sequential = VideoFile(path).decode_segment(0.0, total / coded.fps)
    np.testing.assert_allclose(times, np.arange(total) / coded.fps, atol=1e-6)
    random_video = VideoFile(path)
    order = np.random.default_rng(0).permutation(total)
    random = random_video.frames_at(times[order])
    np.testing.assert_array_equal(random, sequential[order])
    assert random_video.num_seeks > total // 2  # it really was random access
    in_order = VideoFile(path)
    np.testing.assert_array_equal(in_order.frames_at(times), sequential)
    assert in_order.num_seeks == 1 and in_order.num_decoded == total  # one pass, no re-decode


def test_missing_timestamp_names_episode_camera_and_time(demo_v30: Demo) -> None:
    ds = FrameDataset(demo_v30.root)
    shifted = np.array(ds.frames.timestamp)
    shifted[5] += 0.5 / demo_v30.fps  # halfway between two frames
    object.__setattr__(ds.frames, "timestamp", shifted)
    with pytest.raises(FrameTimestampError, match=r"episode 0, camera observation.images.top, t="):
        ds[5]
    ds[6]  # the rest still works


def test_sample_keys_shapes_and_types(demo_v30: Demo) -> None:
    ds = FrameDataset(demo_v30.root, chunk_size=10)
    sample = ds[3]
    assert sample["observation.images.top"].shape == (3, 96, 128)
    assert sample["observation.images.top"].dtype == torch.float32
    image = sample["observation.images.top"]
    assert 0.0 <= image.min() <= image.max() <= 1
    assert sample["observation.state"].shape == (6,)
    assert sample["observation.state"].dtype == torch.float32
    assert sample["action"].shape == (10, 6) and sample["action"].dtype == torch.float32
    assert sample["action_is_pad"].shape == (10,) and sample["action_is_pad"].dtype == torch.bool
    assert sample["task"] == "push the red cube to the left"
    assert int(sample["index"]) == 3 and int(sample["frame_index"]) == 3
    assert float(sample["timestamp"]) == pytest.approx(3 / 30)


def test_uint8_frames_scale_to_exactly_the_float32_frames(demo_v30: Demo) -> None:
    floats = FrameDataset(demo_v30.root, chunk_size=4)
    uint8 = FrameDataset(demo_v30.root, chunk_size=4, image_dtype=torch.uint8)
    rows = [0, 1, 23, 24, len(floats) - 1]
    batch = collate_samples([uint8[r] for r in rows])
    for key in floats.camera_keys:
        expected = torch.stack([floats[r][key] for r in rows])
        assert batch[key].dtype == torch.uint8 and batch[key].shape == expected.shape
        assert torch.equal(batch[key].float() / 255, expected), key  # bit for bit
        assert torch.equal(batch[key].float().div_(255.0), expected), key  # as to_device does
    sample = uint8[rows[0]]
    assert torch.equal(sample["action"], floats[rows[0]]["action"])  # only images differ
    with pytest.raises(ValueError, match="image_dtype"):
        FrameDataset(demo_v30.root, image_dtype=torch.float16)


@pytest.mark.parametrize("chunk_size", [1, 10, 50])
def test_action_chunks_and_pad_masks_at_episode_edges(demo_v30: Demo, chunk_size: int) -> None:
    ds = FrameDataset(demo_v30.root, chunk_size=chunk_size, cameras=[])
    start = 0
    for e, length in enumerate(demo_v30.lengths):
        truth = demo_v30.episode(e)
        for t in {0, 1, length - chunk_size, length - 2, length - 1} & set(range(length)):
            sample = ds[start + t]
            steps = np.arange(t, t + chunk_size)
            clamped = np.minimum(steps, length - 1)
            np.testing.assert_array_equal(sample["action"], truth.action[clamped])
            np.testing.assert_array_equal(sample["action_is_pad"], steps >= length)
            np.testing.assert_array_equal(sample["observation.state"], truth.state[t])
            assert int(sample["episode_index"]) == e
            assert sample["task"] == truth.task
        start += length
    first_of_next = ds[demo_v30.lengths[0]]  # never mixes in the previous episode
    assert int(first_of_next["frame_index"]) == 0 and not first_of_next["action_is_pad"][0]


def test_v30_and_v21_copies_give_identical_samples(demo_v30: Demo, demo_v21: Demo) -> None:
    a, b = FrameDataset(demo_v30.root), FrameDataset(demo_v21.root)
    assert len(a) == len(b)
    for row in [0, 1, 23, 24, 25, 40, len(a) - 1, *np.random.default_rng(1).integers(0, len(a), 8)]:
        sa, sb = a[int(row)], b[int(row)]
        assert sa.keys() == sb.keys()
        for key in sa:
            if isinstance(sa[key], torch.Tensor):
                assert torch.equal(sa[key], sb[key]), (row, key)
            else:
                assert sa[key] == sb[key]


def test_episode_selection_samples(demo_v30: Demo) -> None:
    ds = FrameDataset(demo_v30.root, episodes=[2], chunk_size=4)
    assert len(ds) == demo_v30.lengths[2]
    assert int(ds[0]["episode_index"]) == 2 and int(ds[0]["index"]) == sum(demo_v30.lengths[:2])
    np.testing.assert_array_equal(ds[0]["action"], demo_v30.episode(2).action[:4])


def test_collate(demo_v30: Demo) -> None:
    ds = FrameDataset(demo_v30.root, chunk_size=5)
    batch = collate_samples([ds[i] for i in (0, 30, 60)])
    assert batch["observation.images.wrist"].shape == (3, 3, 96, 128)
    assert batch["action"].shape == (3, 5, 6) and batch["action_is_pad"].dtype == torch.bool
    assert batch["index"].tolist() == [0, 30, 60]
    assert batch["task"] == [ds[i]["task"] for i in (0, 30, 60)]
    with pytest.raises(ValueError, match="empty"):
        collate_samples([])
