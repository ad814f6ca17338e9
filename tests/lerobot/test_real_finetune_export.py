"""LeRobot 0.6.1 loads what a finetune across renamed cameras and other widths exports, and
acts on a raw observation under the dataset's own key names through its own saved
processors, exactly as ours does.

Runs only where `LEROBOT_PYTHON` names an interpreter with `lerobot[smolvla]==0.6.1`.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from smolvla_ray.data.meta import load_meta
from smolvla_ray.policy.pretrained import load_pretrained
from smolvla_ray.spec import spec_from_dict
from smolvla_ray.train.setup import build_policy
from tests.realshape import (
    ACTION_DIM,
    RENAME_MAP,
    STATE_DIM,
    write_base_shaped_checkpoint,
    write_libero_shaped_dataset,
)

LEROBOT_PYTHON = os.environ.get("LEROBOT_PYTHON")
pytestmark = [
    pytest.mark.lerobot,
    pytest.mark.skipif(not LEROBOT_PYTHON, reason="set LEROBOT_PYTHON to a LeRobot 0.6.1 python"),
]


def test_lerobot_acts_on_raw_dataset_keys_like_ours(tmp_path: Path) -> None:
    base = write_base_shaped_checkpoint(tmp_path / "smolvla_base")
    dataset = write_libero_shaped_dataset(tmp_path / "libero", episodes=2, length=10)
    spec = spec_from_dict({
        "name": "oracle",
        "policy": {"pretrained": base},
        "data": {"uri": dataset, "rename_map": RENAME_MAP},
        "train": {"steps": 1, "batch_size": 1},
        "checkpoint": {"storage": str(tmp_path / "runs")},
    })  # fmt: skip
    policy = build_policy(spec, load_meta(dataset), storage_options={})
    with torch.no_grad():  # a "finetuned" expert: not the base's weights
        for param in policy.trainable_parameters().values():
            param.add_(0.01 * torch.randn_like(param))
    policy.save_pretrained(str(tmp_path / "pretrained_model"))

    g = torch.Generator().manual_seed(4)
    raw = {
        "observation.images.image": torch.rand(3, 64, 80, generator=g),
        "observation.images.image2": torch.rand(3, 64, 80, generator=g),
        "observation.state": torch.randn(STATE_DIM, generator=g),
    }
    noise = torch.randn(1, policy.config.chunk_size, policy.config.max_action_dim, generator=g)
    save_file({**raw, "_noise": noise}, str(tmp_path / "raw.safetensors"))
    (tmp_path / "task.json").write_text(json.dumps("push the block to the left"))
    oracle = Path(__file__).with_name("oracle_raw_inference.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([LEROBOT_PYTHON, str(oracle), str(tmp_path)], check=True, env=env)
    theirs = load_file(str(tmp_path / "outputs.safetensors"))

    ours = load_pretrained(str(tmp_path / "pretrained_model")).eval()
    batch = ours.processor.preprocess({**raw, "task": "push the block to the left"})
    # LeRobot renamed the raw keys with the saved map and normalized the 8-D state.
    assert "pre.observation.images.camera1" in theirs
    assert "pre.observation.images.image" not in theirs
    torch.testing.assert_close(batch["observation.state"], theirs["pre.observation.state"])
    assert int(theirs["_image_features"]) == 2  # the cameras actually trained
    with torch.no_grad():
        action = ours.select_action(batch, noise=noise)
    torch.testing.assert_close(action, theirs["normalized_action"], rtol=1e-4, atol=1e-5)
    robot = ours.processor.postprocess(action)
    assert robot.shape == (1, ACTION_DIM)
    torch.testing.assert_close(robot, theirs["action"], rtol=1e-4, atol=1e-5)
