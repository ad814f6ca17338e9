"""Parity with LeRobot 0.6.1 itself: the same checkpoint gives the same loss, gradients and
actions in both, and each side loads what the other saves.

Runs only where `LEROBOT_PYTHON` names an interpreter with `lerobot[smolvla]==0.6.1`
(a development-time oracle; CI does not have it).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from smolvla_ray.policy import SmolVLAPolicy
from smolvla_ray.policy.processor import PolicyProcessor
from tests.unit.policy.conftest import make_batch, tiny_config

LEROBOT_PYTHON = os.environ.get("LEROBOT_PYTHON")
pytestmark = [
    pytest.mark.lerobot,
    pytest.mark.skipif(not LEROBOT_PYTHON, reason="set LEROBOT_PYTHON to a LeRobot 0.6.1 python"),
]


def stats_for(config) -> dict:
    g = torch.Generator().manual_seed(5)
    return {
        "observation.state": {
            "mean": torch.randn(config.state_dim, generator=g),
            "std": torch.rand(config.state_dim, generator=g) + 0.5,
            "min": -torch.ones(config.state_dim),
            "max": torch.ones(config.state_dim),
        },
        "action": {
            "mean": torch.randn(config.action_dim, generator=g),
            "std": torch.rand(config.action_dim, generator=g) + 0.5,
            "min": -torch.ones(config.action_dim),
            "max": torch.ones(config.action_dim),
        },
    }


@pytest.mark.parametrize("train_expert_only", [True, False])
def test_lerobot_matches(tmp_path: Path, train_expert_only: bool) -> None:
    torch.manual_seed(1)
    config = tiny_config(train_expert_only=train_expert_only)
    policy = SmolVLAPolicy(config)
    policy.processor = PolicyProcessor(config, stats_for(config))
    policy.save_pretrained(tmp_path / "pretrained_model")

    batch = make_batch(config, batch_size=3, seed=2)
    noise = torch.randn(3, config.chunk_size, config.max_action_dim)
    time = torch.tensor([0.2, 0.5, 0.9])
    tasks = ["pick the red cube", "push the box to the left\n", "open the drawer"]
    raw_state = torch.randn(3, config.state_dim)
    raw_action = torch.randn(3, config.chunk_size, config.action_dim)
    inputs = {
        **batch,
        "_noise": noise,
        "_time": time,
        "_raw_state": raw_state,
        "_raw_action": raw_action,
    }
    inputs["action_is_pad"] = batch["action_is_pad"]
    save_file({k: v.contiguous() for k, v in inputs.items()}, str(tmp_path / "inputs.safetensors"))
    (tmp_path / "tasks.json").write_text(json.dumps(tasks))
    oracle = Path(__file__).with_name("oracle.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([LEROBOT_PYTHON, str(oracle), str(tmp_path)], check=True, env=env)
    theirs = load_file(str(tmp_path / "outputs.safetensors"))

    policy.train()
    loss, _ = policy(dict(batch), noise=noise, time=time)
    loss.backward()
    torch.testing.assert_close(loss.detach().reshape(1), theirs["loss"], rtol=1e-5, atol=1e-6)
    per_sample, _ = policy(dict(batch), noise=noise, time=time, reduction="none")
    torch.testing.assert_close(per_sample.detach(), theirs["per_sample"], rtol=1e-5, atol=1e-6)
    trainable = policy.trainable_parameters()
    grads = {k.removeprefix("grad."): v for k, v in theirs.items() if k.startswith("grad.")}
    assert set(grads) == set(trainable)
    for name, param in trainable.items():
        torch.testing.assert_close(param.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)
    actions = policy.predict_action_chunk(dict(batch), noise=noise)
    torch.testing.assert_close(actions, theirs["actions"], rtol=1e-4, atol=1e-5)

    processed = policy.processor.preprocess({"observation.state": raw_state, "task": tasks})
    torch.testing.assert_close(processed["observation.state"], theirs["pre.state"])
    assert torch.equal(processed["observation.language.tokens"], theirs["pre.tokens"])
    assert torch.equal(processed["observation.language.attention_mask"].long(), theirs["pre.mask"])
    torch.testing.assert_close(policy.processor.postprocess(raw_action), theirs["post.action"])

    # Reverse: what LeRobot saves, we load, with identical weights.
    reloaded = SmolVLAPolicy.from_pretrained(str(tmp_path / "lerobot_saved"))
    for key, value in policy.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
