"""Shared builders for policy tests: the tiny preset and a random preprocessed batch."""

from __future__ import annotations

import pytest
import torch

from smolvla_ray.policy import PolicyConfig, SmolVLAPolicy

CAMERAS = {"top": (3, 48, 64), "wrist": (3, 64, 64)}


def tiny_config(**overrides) -> PolicyConfig:
    return PolicyConfig.preset("tiny", **overrides).with_features(
        state_dim=6, action_dim=5, cameras=CAMERAS
    )


def make_batch(config: PolicyConfig, *, batch_size: int = 3, seed: int = 0) -> dict:
    """A batch as LeRobot's preprocessor hands it to forward, with some padded language
    tokens and some padded action steps."""
    g = torch.Generator().manual_seed(seed)
    batch = {
        f"observation.images.{name}": torch.rand(batch_size, *shape, generator=g)
        for name, shape in CAMERAS.items()
    }
    batch["observation.state"] = torch.randn(batch_size, config.state_dim, generator=g)
    batch["action"] = torch.randn(batch_size, config.chunk_size, config.action_dim, generator=g)
    is_pad = torch.zeros(batch_size, config.chunk_size, dtype=torch.bool)
    is_pad[0, config.chunk_size - 3 :] = True
    batch["action_is_pad"] = is_pad
    length = 7
    batch["observation.language.tokens"] = torch.randint(5, 300, (batch_size, length), generator=g)
    lang_mask = torch.ones(batch_size, length, dtype=torch.bool)
    lang_mask[-1, 4:] = False
    batch["observation.language.attention_mask"] = lang_mask
    return batch


@pytest.fixture
def tiny_policy() -> SmolVLAPolicy:
    torch.manual_seed(0)
    return SmolVLAPolicy(tiny_config())
