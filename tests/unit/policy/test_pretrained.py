"""save_pretrained / from_pretrained: LeRobot's layout, identical outputs, strict keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from smolvla_ray.policy import SmolVLAPolicy
from smolvla_ray.policy.processor import PolicyProcessor
from tests.unit.policy.conftest import make_batch


def stats(config) -> dict:
    return {
        "observation.state": {"mean": torch.arange(6.0), "std": torch.full((6,), 2.0)},
        "action": {"mean": torch.full((5,), -1.0), "std": torch.arange(1.0, 6.0)},
    }


@pytest.fixture
def saved(tmp_path: Path, tiny_policy: SmolVLAPolicy) -> tuple[SmolVLAPolicy, Path]:
    tiny_policy.processor = PolicyProcessor(tiny_policy.config, stats(tiny_policy.config))
    target = tmp_path / "pretrained_model"
    tiny_policy.save_pretrained(target)
    return tiny_policy, target


def test_layout_is_lerobots(saved) -> None:
    _, target = saved
    assert sorted(p.name for p in target.iterdir()) == [
        "config.json",
        "model.safetensors",
        "policy_postprocessor.json",
        "policy_postprocessor_step_0_unnormalizer_processor.safetensors",
        "policy_preprocessor.json",
        "policy_preprocessor_step_5_normalizer_processor.safetensors",
    ]
    assert json.loads((target / "config.json").read_text())["type"] == "smolvla"
    weights = load_file(str(target / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in weights.values())
    assert "model.vlm_with_expert.lm_expert.layers.0.self_attn.q_proj.weight" in weights
    normalizer = load_file(
        str(target / "policy_preprocessor_step_5_normalizer_processor.safetensors")
    )
    assert torch.equal(normalizer["observation.state.mean"], torch.arange(6.0))


def test_round_trip_gives_identical_outputs(saved) -> None:
    policy, target = saved
    loaded = SmolVLAPolicy.from_pretrained(str(target))
    batch = make_batch(policy.config)
    noise = torch.randn(3, policy.config.chunk_size, policy.config.max_action_dim)
    time = torch.tensor([0.1, 0.5, 0.9])
    policy.train()
    loaded.train()
    assert torch.equal(policy(dict(batch), noise, time)[0], loaded(dict(batch), noise, time)[0])
    assert torch.equal(
        policy.predict_action_chunk(dict(batch), noise),
        loaded.predict_action_chunk(dict(batch), noise),
    )
    assert torch.equal(loaded.processor.stats["action"]["std"], torch.arange(1.0, 6.0))


def test_round_trip_through_fsspec_url(saved) -> None:
    policy, _ = saved
    policy.save_pretrained("memory://ckpt/pretrained_model")
    loaded = SmolVLAPolicy.from_pretrained("memory://ckpt/pretrained_model")
    for key, value in policy.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_missing_tensor_is_named(saved) -> None:
    _, target = saved
    weights = load_file(str(target / "model.safetensors"))
    del weights["model.action_out_proj.bias"]
    save_file(weights, str(target / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensors: model\.action_out_proj\.bias"):
        SmolVLAPolicy.from_pretrained(str(target))


def test_extra_tensor_is_named(saved) -> None:
    _, target = saved
    weights = load_file(str(target / "model.safetensors"))
    weights["model.surprise.weight"] = torch.zeros(2)
    save_file(weights, str(target / "model.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected tensors: model\.surprise\.weight"):
        SmolVLAPolicy.from_pretrained(str(target))


def test_wrong_shape_is_named(saved) -> None:
    _, target = saved
    weights = load_file(str(target / "model.safetensors"))
    weights["model.state_proj.bias"] = torch.zeros(3)
    save_file(weights, str(target / "model.safetensors"))
    with pytest.raises(ValueError, match=r"wrong shapes: model\.state_proj\.bias: \(3,\)"):
        SmolVLAPolicy.from_pretrained(str(target))


def test_missing_directory_and_files(tmp_path: Path, saved) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SmolVLAPolicy.from_pretrained(str(tmp_path / "nowhere"))
    _, target = saved
    (target / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        SmolVLAPolicy.from_pretrained(str(target))
