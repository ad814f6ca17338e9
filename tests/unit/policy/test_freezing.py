"""Freezing overrides: requires_grad and module modes exactly as LeRobot's (docs/design.md,
"LeRobot facts"), for all 8 combinations, stable under repeated train()/eval().

The expectations are written from the reference's rules, by parameter name, independently of
the implementation.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from smolvla_ray.policy import SmolVLAPolicy
from tests.unit.policy.conftest import tiny_config

VISION = "model.vlm_with_expert.vlm.model.vision_model."
VLM = "model.vlm_with_expert.vlm."


def expected_trainable(name: str, *, fve: bool, teo: bool, tsp: bool, frozen_layers: list[int]):
    if name.startswith("model.state_proj."):
        return tsp
    if name.startswith(VISION):
        return not (fve or teo)
    if name.startswith(VLM):
        if teo:
            return False
        partial = ["lm_head", "text_model.norm.weight"]
        partial += [f"text_model.layers.{i}." for i in frozen_layers]
        return not any(p in name for p in partial)
    return "lm_head" not in name  # expert and projections


def expected_training(module_name: str, *, fve: bool, teo: bool) -> bool:
    prefix = f"{module_name}."
    if teo and prefix.startswith(VLM):
        return False
    return not ((fve or teo) and prefix.startswith(VISION))


COMBOS = list(itertools.product([True, False], repeat=3))


@pytest.mark.parametrize(("fve", "teo", "tsp"), COMBOS)
def test_requires_grad_and_modes(fve: bool, teo: bool, tsp: bool) -> None:
    policy = SmolVLAPolicy(
        tiny_config(freeze_vision_encoder=fve, train_expert_only=teo, train_state_proj=tsp)
    )
    for name, param in policy.named_parameters():
        want = expected_trainable(name, fve=fve, teo=teo, tsp=tsp, frozen_layers=[3])
        assert param.requires_grad == want, name
    assert set(policy.trainable_parameters()) == {
        n for n, p in policy.named_parameters() if p.requires_grad
    }
    for _ in range(3):
        policy.train()
        for name, module in policy.named_modules():
            if name:
                assert module.training == expected_training(name, fve=fve, teo=teo), name
        policy.eval()
        assert not any(m.training for m in policy.modules())


def test_partial_vlm_with_shallower_expert_freezes_two_last_layers() -> None:
    policy = SmolVLAPolicy(tiny_config(train_expert_only=False, num_expert_layers=2))
    for name, param in policy.named_parameters():
        want = expected_trainable(name, fve=True, teo=False, tsp=True, frozen_layers=[3, 2])
        assert param.requires_grad == want, name


def test_partial_vlm_frozen_params_get_no_gradient_but_the_rest_do() -> None:
    """The partly trainable VLM freezes exactly what would get no gradient (DDP's concern)."""
    from tests.unit.policy.conftest import make_batch

    torch.manual_seed(0)
    policy = SmolVLAPolicy(tiny_config(train_expert_only=False, freeze_vision_encoder=False))
    policy.train()
    loss, _ = policy(make_batch(policy.config))
    loss.backward()
    no_grad = [n for n, p in policy.trainable_parameters().items() if p.grad is None]
    assert no_grad == []
