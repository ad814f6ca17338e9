"""The base preset is LeRobot's model: exact parameter counts and state-dict keys."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from smolvla_ray.policy import PolicyConfig, SmolVLAPolicy

PREFIXES = {
    "model.vlm_with_expert.vlm.model.vision_model.": 197,
    "model.vlm_with_expert.vlm.model.text_model.": 146,
    "model.vlm_with_expert.vlm.model.connector.": 1,
    "model.vlm_with_expert.vlm.lm_head.": 1,
    "model.vlm_with_expert.lm_expert.": 16 * 9 + 1,
}
PROJECTIONS = [
    "state_proj",
    "action_in_proj",
    "action_out_proj",
    "action_time_mlp_in",
    "action_time_mlp_out",
]


@pytest.fixture(scope="module")
def base_policy() -> SmolVLAPolicy:
    config = PolicyConfig.preset("base").with_features(
        state_dim=6, action_dim=6, cameras={"top": (3, 480, 640)}
    )
    with torch.device("meta"):  # shapes only: counting needs no memory or init time
        return SmolVLAPolicy(config)


def test_base_parameter_counts(base_policy: SmolVLAPolicy) -> None:
    total = sum(p.numel() for p in base_policy.parameters())
    trainable = sum(p.numel() for p in base_policy.parameters() if p.requires_grad)
    assert total == 450_046_176
    assert trainable == 99_880_992
    expert = sum(p.numel() for p in base_policy.model.vlm_with_expert.lm_expert.parameters())
    assert expert == 98_245_840


def test_base_state_dict_keys(base_policy: SmolVLAPolicy) -> None:
    keys = list(base_policy.state_dict())
    assert len(keys) == 500
    counts = Counter(next((p for p in PREFIXES if k.startswith(p)), k) for k in keys)
    for prefix, expected in PREFIXES.items():
        assert counts[prefix] == expected, prefix
    for name in PROJECTIONS:
        assert f"model.{name}.weight" in keys and f"model.{name}.bias" in keys


def test_base_shapes(base_policy: SmolVLAPolicy) -> None:
    sd = base_policy.state_dict()
    expert = "model.vlm_with_expert.lm_expert.layers"
    assert sd[f"{expert}.0.self_attn.k_proj.weight"].shape == (320, 720)  # joint layer
    assert sd[f"{expert}.1.self_attn.k_proj.weight"].shape == (320, 320)  # cross layer
    assert sd[f"{expert}.0.mlp.gate_proj.weight"].shape == (2048, 720)
    proj = "model.vlm_with_expert.vlm.model.connector.modality_projection.proj.weight"
    assert sd[proj].shape == (960, 768 * 16)
    assert sd["model.state_proj.weight"].shape == (960, 32)
    assert sd["model.action_time_mlp_in.weight"].shape == (720, 1440)
