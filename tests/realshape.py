"""Real-world shapes at tiny size: a checkpoint shaped like `lerobot/smolvla_base` (cameras
camera1..3, 6-D state and action declared in its config.json, LeRobot's bookkeeping fields)
and a dataset shaped like LeRobot's LIBERO (cameras `image` and `image2`, 8-D state, 7-D
action), so tests finetune across other camera names and widths as real users do."""

from __future__ import annotations

from pathlib import Path

import torch

BASE_CAMERAS = {f"camera{i}": (3, 256, 256) for i in (1, 2, 3)}
DATASET_CAMERAS = ("image", "image2")
RENAME_MAP = {
    "observation.images.image": "observation.images.camera1",
    "observation.images.image2": "observation.images.camera2",
}
STATE_DIM, ACTION_DIM = 8, 7


def write_base_shaped_checkpoint(directory: Path, *, seed: int = 3) -> str:
    """A `pretrained_model/` with smolvla_base's feature layout at the tiny preset's size."""
    from smolvla_ray.policy import PolicyConfig, SmolVLAPolicy
    from smolvla_ray.policy.processor import PolicyProcessor

    config = PolicyConfig.preset(
        "tiny", repo_id="lerobot/smolvla_base", push_to_hub=True, tags=["smolvla"]
    ).with_features(state_dim=6, action_dim=6, cameras=BASE_CAMERAS)
    torch.manual_seed(seed)
    policy = SmolVLAPolicy(config)
    g = torch.Generator().manual_seed(seed)
    stats = {
        key: {"mean": torch.randn(6, generator=g), "std": torch.rand(6, generator=g) + 0.5}
        for key in ("observation.state", "action")
    }
    policy.processor = PolicyProcessor(config, stats)
    policy.save_pretrained(str(directory))
    return str(directory)


def write_libero_shaped_dataset(directory: Path, *, episodes: int = 4, length: int = 40) -> str:
    """A v3.0 dataset with real AV1 videos, LIBERO's camera names and widths."""
    from smolvla_ray.data.synthetic import write_demo_dataset

    return write_demo_dataset(
        str(directory),
        num_episodes=episodes,
        episode_length=length,
        cameras=DATASET_CAMERAS,
        state_dim=STATE_DIM,
        action_dim=ACTION_DIM,
        height=64,
        width=80,
    )
