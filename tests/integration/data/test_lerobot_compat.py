"""LeRobot 0.6.1 itself loads what our writer writes, and its samples equal ours.

Runs only where `LEROBOT_PYTHON` names an interpreter with LeRobot 0.6.1 installed (with its
`dataset` extra); LeRobot runs in a subprocess and is never imported here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from smolvla_ray.data.samples import FrameDataset
from smolvla_ray.data.synthetic import write_demo_dataset

LEROBOT_PYTHON = os.environ.get("LEROBOT_PYTHON")
pytestmark = [
    pytest.mark.lerobot,
    pytest.mark.skipif(not LEROBOT_PYTHON, reason="set LEROBOT_PYTHON to a LeRobot 0.6.1 python"),
]
ORACLE = Path(__file__).with_name("lerobot_oracle.py")
CHUNK = 50
KEYS = [
    "observation.state",
    "action",
    "action_is_pad",
    "index",
    "episode_index",
    "frame_index",
    "timestamp",
    "observation.images.top",
    "observation.images.wrist",
]


def _lerobot_items(root: Path, rows: list[int], out: Path, *extra: str) -> dict:
    subprocess.run(
        [
            LEROBOT_PYTHON,
            str(ORACLE),
            str(root),
            str(out),
            str(CHUNK),
            ",".join(map(str, rows)),
            *extra,
        ],
        check=True,
        capture_output=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return dict(np.load(out))


@pytest.mark.parametrize("codec", ["av1", "h264"])
@pytest.mark.parametrize("version", ["v3.0", "v2.1"])
def test_lerobot_loads_our_dataset_with_equal_samples(
    tmp_path: Path, version: str, codec: str
) -> None:
    root = tmp_path / "demo"
    write_demo_dataset(str(root), format=version, codec=codec, num_episodes=4, episode_length=40)
    ours = FrameDataset(str(root), chunk_size=CHUNK)
    ends = np.cumsum([e.length for e in ours.meta.episodes])
    rows = sorted({0, 1, 13, int(ends[0]) - 1, int(ends[0]), int(ends[1]) + 5, len(ours) - 1})
    lerobot_root = tmp_path / "for-lerobot"
    shutil.copytree(root, lerobot_root)  # the v2.1 conversion rewrites its input in place
    extra = ("--convert-v21",) if version == "v2.1" else ()
    theirs = _lerobot_items(lerobot_root, rows, tmp_path / "items.npz", *extra)
    assert int(theirs["__len__"]) == len(ours)
    for row in rows:
        sample = ours[row]
        for key in KEYS:
            mine = sample[key].numpy() if isinstance(sample[key], torch.Tensor) else sample[key]
            np.testing.assert_array_equal(mine, theirs[f"{row}/{key}"], err_msg=f"{row} {key}")
        assert str(theirs[f"{row}/task"]) == sample["task"]
