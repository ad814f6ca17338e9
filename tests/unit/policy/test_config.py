"""PolicyConfig: LeRobot's field names, defaults and config.json, both ways."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from smolvla_ray.policy import PolicyConfig

# Written by LeRobot 0.6.1's SmolVLAConfig._save_pretrained (defaults, one camera).
LEROBOT_DEFAULTS = {
    "type": "smolvla",
    "n_obs_steps": 1,
    "device": "cpu",
    "use_amp": False,
    "use_peft": False,
    "push_to_hub": True,
    "repo_id": None,
    "private": None,
    "tags": None,
    "license": None,
    "pretrained_path": None,
    "pretrained_revision": None,
    "chunk_size": 50,
    "n_action_steps": 50,
    "normalization_mapping": {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"},
    "max_state_dim": 32,
    "max_action_dim": 32,
    "resize_imgs_with_padding": [512, 512],
    "empty_cameras": 0,
    "adapt_to_pi_aloha": False,
    "use_delta_joint_actions_aloha": False,
    "tokenizer_max_length": 48,
    "num_steps": 10,
    "use_cache": True,
    "freeze_vision_encoder": True,
    "train_expert_only": True,
    "train_state_proj": True,
    "optimizer_lr": 0.0001,
    "optimizer_betas": [0.9, 0.95],
    "optimizer_eps": 1e-08,
    "optimizer_weight_decay": 1e-10,
    "optimizer_grad_clip_norm": 10,
    "scheduler_warmup_steps": 1000,
    "scheduler_decay_steps": 30000,
    "scheduler_decay_lr": 2.5e-06,
    "vlm_model_name": "HuggingFaceTB/SmolVLM2-500M-Video-Instruct",
    "load_vlm_weights": False,
    "add_image_special_tokens": False,
    "attention_mode": "cross_attn",
    "prefix_length": -1,
    "pad_language_to": "longest",
    "num_expert_layers": -1,
    "num_vlm_layers": 16,
    "self_attn_every_n_layers": 2,
    "expert_width_multiplier": 0.75,
    "min_period": 0.004,
    "max_period": 4.0,
    "rtc_config": None,
    "compile_model": False,
    "compile_mode": "max-autotune",
}


def test_defaults_and_json_equal_lerobots() -> None:
    config = PolicyConfig()
    written = json.loads(config.to_lerobot_json())
    features = {"input_features", "output_features"}
    assert {k: v for k, v in written.items() if k not in features} == LEROBOT_DEFAULTS


def test_lerobot_json_round_trip_with_features() -> None:
    config = PolicyConfig.preset("base").with_features(
        state_dim=6, action_dim=6, cameras={"top": (3, 480, 640), "wrist": (3, 480, 640)}
    )
    again = PolicyConfig.from_lerobot_json(config.to_lerobot_json())
    assert again == config
    assert list(again.image_features) == ["observation.images.top", "observation.images.wrist"]
    data = json.loads(config.to_lerobot_json())
    assert data["input_features"]["observation.images.top"] == {
        "type": "VISUAL",
        "shape": [3, 480, 640],
    }


def test_unknown_field_is_named() -> None:
    data = {**LEROBOT_DEFAULTS, "chunk_sise": 10}
    with pytest.raises(ValidationError, match="chunk_sise"):
        PolicyConfig.from_lerobot_json(json.dumps(data))


def test_malformed_json_names_source() -> None:
    with pytest.raises(ValueError, match=r"ckpt/config.json is not valid JSON"):
        PolicyConfig.from_lerobot_json("{", source="ckpt/config.json")


def test_n_action_steps_bounded_by_chunk() -> None:
    with pytest.raises(ValidationError, match="n_action_steps=60 exceeds chunk_size=50"):
        PolicyConfig(n_action_steps=60)


def test_presets() -> None:
    assert PolicyConfig.preset("base") == PolicyConfig()
    tiny = PolicyConfig.preset("tiny", chunk_size=8, n_action_steps=8)
    assert tiny.chunk_size == 8 and tiny.resize_imgs_with_padding == (64, 64)
    with pytest.raises(ValueError, match="unknown policy preset 'huge'"):
        PolicyConfig.preset("huge")  # type: ignore[arg-type]


def test_validate_features_names_the_problem() -> None:
    no_camera = PolicyConfig.preset("tiny").with_features(state_dim=6, action_dim=6, cameras={})
    with pytest.raises(ValueError, match="no VISUAL feature"):
        no_camera.validate_features()
    wide = PolicyConfig.preset("tiny").with_features(
        state_dim=9, action_dim=6, cameras={"top": (3, 64, 64)}
    )
    with pytest.raises(ValueError, match="observation.state has 9 dims, more than max_state_dim=8"):
        wide.validate_features()
