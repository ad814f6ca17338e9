"""Sampling, the processor's numerics, and clear errors for bad batches."""

from __future__ import annotations

import pytest
import torch

from smolvla_ray.policy import SmolVLAPolicy
from smolvla_ray.policy.processor import PolicyProcessor
from tests.unit.policy.conftest import make_batch, tiny_config


def test_action_chunk_shape_and_determinism(tiny_policy: SmolVLAPolicy) -> None:
    config = tiny_policy.config
    batch = make_batch(config, batch_size=2)
    noise = torch.randn(2, config.chunk_size, config.max_action_dim)
    first = tiny_policy.predict_action_chunk(dict(batch), noise)
    again = tiny_policy.predict_action_chunk(dict(batch), noise)
    assert first.shape == (2, config.chunk_size, config.action_dim)
    assert torch.equal(first, again)
    other = tiny_policy.predict_action_chunk(dict(batch), torch.randn_like(noise))
    assert not torch.allclose(first, other)


def test_sampling_with_prefix_cache_equals_full_recompute(tiny_policy: SmolVLAPolicy) -> None:
    """Euler over the cached prefix equals Euler where each step re-runs the joint forward."""
    config = tiny_policy.config
    batch = make_batch(config, batch_size=2)
    noise = torch.randn(2, config.chunk_size, config.max_action_dim)
    cached = tiny_policy.predict_action_chunk(dict(batch), noise)
    model = tiny_policy.model
    images, img_masks = tiny_policy.prepare_images(batch)
    state = tiny_policy.prepare_state(batch)
    tokens = batch["observation.language.tokens"]
    masks = batch["observation.language.attention_mask"]
    x_t, dt = noise, -1.0 / config.num_steps
    with torch.no_grad():
        for step in range(config.num_steps):
            time = torch.full((2,), 1.0 + step * dt)
            suffix = model.embed_suffix(x_t, time)
            out = model._expert_joint(images, img_masks, tokens, masks, state, suffix)
            x_t = x_t + dt * model.action_out_proj(out[:, -config.chunk_size :])
    torch.testing.assert_close(cached, x_t[:, :, : config.action_dim], rtol=1e-5, atol=1e-5)


def test_select_action_pops_a_chunk(tiny_policy: SmolVLAPolicy) -> None:
    config = tiny_policy.config
    batch = make_batch(config, batch_size=1)
    noise = torch.randn(1, config.chunk_size, config.max_action_dim)
    chunk = tiny_policy.predict_action_chunk(dict(batch), noise)
    tiny_policy.reset()
    actions = [tiny_policy.select_action(dict(batch), noise) for _ in range(config.n_action_steps)]
    torch.testing.assert_close(torch.stack(actions, dim=1), chunk)


def test_processor_normalizes_tokenizes_and_unnormalizes(tiny_policy: SmolVLAPolicy) -> None:
    config = tiny_policy.config
    stats = {
        "observation.state": {"mean": torch.full((6,), 1.0), "std": torch.full((6,), 2.0)},
        "action": {"mean": torch.full((5,), 3.0), "std": torch.full((5,), 4.0)},
    }
    processor = PolicyProcessor(config, stats)
    raw = {
        "observation.state": torch.full((6,), 5.0),  # one observation: gains a batch dim
        "observation.images.top": torch.rand(3, 48, 64),
        "observation.images.wrist": torch.rand(3, 64, 64),
        "task": "pick the red cube",
    }
    batch = processor.preprocess(raw)
    torch.testing.assert_close(batch["observation.state"], torch.full((1, 6), 4.0 / (2.0 + 1e-8)))
    assert batch["observation.images.top"].shape == (1, 3, 48, 64)
    tokens = batch["observation.language.tokens"]
    newline = processor.tokenize(["pick the red cube\n"])[0]
    assert torch.equal(tokens, newline)  # the newline is appended exactly once
    long_task = " ".join(["pick the red cube"] * 40)
    assert processor.tokenize([long_task])[0].shape[1] == config.tokenizer_max_length
    two, mask = processor.tokenize(["up", "pick the red cube in the bin"])
    assert two.shape[0] == 2 and not mask[0].all() and mask[1].all()  # right padding
    assert mask[0, 0] and not mask[0, -1]
    chunk = tiny_policy.predict_action_chunk(batch)
    torch.testing.assert_close(processor.postprocess(chunk), chunk * 4.0 + 3.0)


def test_processor_requires_stats() -> None:
    with pytest.raises(ValueError, match="lack mean/std for 'action'"):
        PolicyProcessor(tiny_config(), {"observation.state": {"mean": [0.0], "std": [1.0]}})


def test_missing_camera_names_key_and_shape(tiny_policy: SmolVLAPolicy) -> None:
    batch = make_batch(tiny_policy.config)
    del batch["observation.images.wrist"]
    with pytest.raises(
        ValueError, match=r"missing camera 'observation.images.wrist'.*\(B, 3, 64, 64\)"
    ):
        tiny_policy(batch)


def test_wrong_state_width_names_key_and_shape(tiny_policy: SmolVLAPolicy) -> None:
    batch = make_batch(tiny_policy.config)
    batch["observation.state"] = torch.zeros(3, 4)
    with pytest.raises(
        ValueError, match=r"observation.state has shape \(3, 4\); expected \(B, 6\)"
    ):
        tiny_policy(batch)


def test_wrong_action_shape_and_missing_tokens(tiny_policy: SmolVLAPolicy) -> None:
    batch = make_batch(tiny_policy.config)
    batch["action"] = batch["action"][:, :3]
    with pytest.raises(ValueError, match=r"action has shape \(3, 3, 5\); expected \(B, 10, 5\)"):
        tiny_policy(batch)
    batch = make_batch(tiny_policy.config)
    del batch["observation.language.tokens"]
    with pytest.raises(ValueError, match="missing 'observation.language.tokens'"):
        tiny_policy(batch)


def test_empty_cameras_fill_missing_ones() -> None:
    policy = SmolVLAPolicy(tiny_config(empty_cameras=1))
    batch = make_batch(policy.config)
    del batch["observation.images.wrist"]
    loss, _ = policy(batch)
    assert torch.isfinite(loss)


def test_reduction_none_is_per_sample_mean_over_valid_steps(tiny_policy: SmolVLAPolicy) -> None:
    batch = make_batch(tiny_policy.config)
    noise = torch.randn(3, 10, 8)
    time = torch.tensor([0.3, 0.6, 0.9])
    per_sample, _ = tiny_policy(dict(batch), noise, time, reduction="none")
    mean, _ = tiny_policy(dict(batch), noise, time)
    valid = (~batch["action_is_pad"]).sum(dim=1).float()
    torch.testing.assert_close((per_sample * valid).sum() / valid.sum(), mean)
