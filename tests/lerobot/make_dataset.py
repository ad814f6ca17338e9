"""Writes tests/fixtures/datasets/lerobot_written/ with LeRobot 0.6.1's own dataset writer:
shapes this project did not choose (one camera `front` of 48x64, 5-D state, 4-D action, two
tasks, 3 episodes of 16 frames at 10 fps, AV1 video as LeRobot encodes it).

Run with a python that has `lerobot[dataset]==0.6.1` (never the project's own):
    LEROBOT_PYTHON tests/lerobot/make_dataset.py tests/fixtures/datasets/lerobot_written
"""

import sys
from pathlib import Path

import numpy as np
from lerobot.datasets.lerobot_dataset import LeRobotDataset

FEATURES = {
    "observation.images.front": {
        "dtype": "video",
        "shape": (48, 64, 3),
        "names": ["height", "width", "channels"],
    },
    "observation.state": {"dtype": "float32", "shape": (5,), "names": None},
    "action": {"dtype": "float32", "shape": (4,), "names": None},
}


def main(root: Path) -> None:
    dataset = LeRobotDataset.create(
        repo_id="local/lerobot_written", fps=10, features=FEATURES, root=root, use_videos=True
    )
    rng = np.random.default_rng(0)
    for episode in range(3):
        for _ in range(16):
            dataset.add_frame(
                {
                    "observation.images.front": rng.integers(0, 255, (48, 64, 3), dtype=np.uint8),
                    "observation.state": rng.standard_normal(5).astype(np.float32),
                    "action": rng.standard_normal(4).astype(np.float32),
                    "task": "pick the cube" if episode % 2 == 0 else "place the cube",
                }
            )
        dataset.save_episode()
    dataset.finalize()
    print(f"written: {root}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
