"""Run by LeRobot's interpreter (never imported by our tests): dump LeRobot's samples.

    $LEROBOT_PYTHON lerobot_oracle.py ROOT OUT.npz CHUNK_SIZE ROWS [--convert-v21]

Loads ROOT with LeRobot 0.6.1's own `LeRobotDataset` (offline, PyAV backend, an action chunk
of CHUNK_SIZE steps via `delta_timestamps`) and saves the items at ROWS for comparison. With
`--convert-v21`, ROOT (a v2.1 dataset) is first converted in place by LeRobot's
`convert_dataset_v21_to_v30`, since LeRobot 0.6.1 refuses to load v2.1 directly.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np


def main() -> None:
    root, out, chunk_size, rows = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    if "--convert-v21" in sys.argv:
        from lerobot.scripts.convert_dataset_v21_to_v30 import convert_dataset

        convert_dataset(repo_id="local/demo", root=root, push_to_hub=False, force_conversion=True)
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    fps = LeRobotDataset(repo_id="local/demo", root=root, video_backend="pyav").meta.fps
    dataset = LeRobotDataset(
        repo_id="local/demo",
        root=root,
        video_backend="pyav",
        delta_timestamps={"action": [i / fps for i in range(chunk_size)]},
    )
    arrays = {"__len__": np.array(len(dataset))}
    for row in (int(r) for r in rows.split(",")):
        item = dataset[row]
        for key, value in item.items():
            if hasattr(value, "numpy"):
                arrays[f"{row}/{key}"] = value.numpy()
        arrays[f"{row}/task"] = np.array(item["task"])
    np.savez(out, **arrays)


if __name__ == "__main__":
    main()
