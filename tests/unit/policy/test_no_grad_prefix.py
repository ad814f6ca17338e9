"""The no-grad prefix equals LeRobot's joint forward: same loss, same gradients."""

from __future__ import annotations

import pytest
import torch

from smolvla_ray.policy import SmolVLAPolicy
from tests.unit.policy.conftest import make_batch, tiny_config


def loss_and_grads(policy: SmolVLAPolicy, batch: dict, noise, time, mode: str):
    policy.prefix_mode = mode
    policy.zero_grad(set_to_none=True)
    loss, _ = policy(dict(batch), noise=noise, time=time)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in policy.trainable_parameters().items()}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("train_state_proj", [True, False])
def test_equal_loss_and_gradients(seed: int, train_state_proj: bool) -> None:
    torch.manual_seed(seed)
    policy = SmolVLAPolicy(tiny_config(train_state_proj=train_state_proj))
    policy.train()
    batch = make_batch(policy.config, batch_size=3, seed=seed)
    assert batch["action_is_pad"].any()  # padded actions are part of every case
    g = torch.Generator().manual_seed(100 + seed)
    noise = torch.randn(3, policy.config.chunk_size, policy.config.max_action_dim, generator=g)
    time = torch.rand(3, generator=g) * 0.999 + 0.001
    joint_loss, joint_grads = loss_and_grads(policy, batch, noise, time, "joint")
    fast_loss, fast_grads = loss_and_grads(policy, batch, noise, time, "no_grad")
    torch.testing.assert_close(fast_loss, joint_loss, rtol=1e-5, atol=1e-6)
    assert set(fast_grads) == set(joint_grads)
    assert ("model.state_proj.weight" in fast_grads) == train_state_proj
    for name, grad in joint_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_auto_uses_no_grad_prefix_only_when_vlm_is_frozen() -> None:
    frozen = SmolVLAPolicy(tiny_config())
    assert frozen.model.vlm_is_frozen()
    partial = SmolVLAPolicy(tiny_config(train_expert_only=False))
    assert not partial.model.vlm_is_frozen()
    partial.prefix_mode = "no_grad"
    with pytest.raises(RuntimeError, match="needs a fully frozen VLM"):
        partial(make_batch(partial.config))


def test_no_grad_prefix_builds_no_graph_through_the_vlm() -> None:
    """Autograd keeps no VLM activation of the image/language tokens (LeRobot's joint forward
    does: its prefix rows attend to grad-carrying keys, so the whole VLM enters the graph)."""
    torch.manual_seed(0)
    policy = SmolVLAPolicy(tiny_config())
    policy.train()
    batch = make_batch(policy.config, batch_size=2)
    text = policy.model.vlm_with_expert.text_config
    vlm_widths = {text.hidden_size, text.intermediate_size}
    # image tokens per camera (16) x 2 cameras + 7 language tokens, with or without the state
    context_lengths = {39, 40}

    def saved_vlm_prefix_activations(mode: str) -> int:
        policy.prefix_mode = mode
        count = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal count
            if t.ndim == 3 and t.shape[1] in context_lengths and t.shape[-1] in vlm_widths:
                count += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            policy(dict(batch))
        return count

    assert saved_vlm_prefix_activations("joint") > 0
    assert saved_vlm_prefix_activations("no_grad") == 0


def test_cached_vision_features_give_equal_loss_and_gradients() -> None:
    """Training from the frozen encoder's precomputed output equals training from images."""
    torch.manual_seed(0)
    policy = SmolVLAPolicy(tiny_config())
    policy.train()
    batch = make_batch(policy.config, batch_size=3, seed=4)
    noise = torch.randn(3, policy.config.chunk_size, policy.config.max_action_dim)
    time = torch.tensor([0.2, 0.5, 0.8])
    loss, grads = loss_and_grads(policy, batch, noise, time, "auto")
    features = policy.encode_images(batch)
    policy.train()
    cached = {k: v for k, v in batch.items() if not k.startswith("observation.images.")}
    cached.update(features)
    cached_loss, cached_grads = loss_and_grads(policy, cached, noise, time, "auto")
    torch.testing.assert_close(cached_loss, loss, rtol=1e-6, atol=1e-7)
    for name, grad in grads.items():
        torch.testing.assert_close(cached_grads[name], grad, rtol=1e-6, atol=1e-7, msg=name)
