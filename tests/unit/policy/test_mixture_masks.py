"""A mixture's per-sample masks in the policy: a narrower dataset's padded action dims
carry no loss (nor gradient), and a camera a sample lacks is masked out for that sample."""

from __future__ import annotations

import torch

from smolvla_ray.keys import ACTION_DIM_MASK
from smolvla_ray.policy import SmolVLAPolicy
from smolvla_ray.train.step import flow_noise_and_time, valid_elements
from tests.unit.policy.conftest import make_batch

NARROW = 3  # the narrower sample's real action dims (the policy's action_dim is 5)


def _noise(policy: SmolVLAPolicy, batch_size: int):
    config = policy.config
    return flow_noise_and_time(
        list(range(batch_size)), seed=0, step=1, chunk_size=config.chunk_size,
        action_dim=config.max_action_dim,
    )  # fmt: skip


def test_padded_action_dims_of_a_narrower_sample_carry_no_loss(tiny_policy: SmolVLAPolicy):
    """Sample 1 comes from a dataset with 3-D actions, zero-padded to the policy's 5 (as the
    mixture loader pads them): its loss is the mean over its 3 real dims only, and no
    gradient reaches the output rows of its padded dims."""
    config = tiny_policy.config
    batch = make_batch(config)
    batch["action"][1, :, NARROW:] = 0.0
    dims = torch.ones(3, config.action_dim, dtype=torch.bool)
    dims[1, NARROW:] = False
    noise, time = _noise(tiny_policy, 3)

    def sample_1(with_mask: bool) -> tuple[torch.Tensor, torch.Tensor]:
        tiny_policy.zero_grad()
        given = {**batch, ACTION_DIM_MASK: dims} if with_mask else batch
        loss = tiny_policy.per_sample_loss(given, noise, time)[1]
        loss.backward()
        return loss.detach(), tiny_policy.model.action_out_proj.weight.grad.clone()

    masked, grad = sample_1(True)
    unmasked, grad_unmasked = sample_1(False)
    elements, is_pad = tiny_policy._masked_losses(batch, noise, time)
    steps = (~is_pad[1]).sum()
    expected = elements[1, :, :NARROW].sum() / (steps * NARROW)
    torch.testing.assert_close(masked, expected.detach(), rtol=1e-6, atol=0)
    assert torch.count_nonzero(grad[NARROW:]) == 0  # padded dims: no gradient at all
    assert torch.count_nonzero(grad[:NARROW]) > 0
    # Without the mask the padded dims count (the test could fail).
    assert torch.count_nonzero(grad_unmasked[NARROW : config.action_dim]) > 0
    assert not torch.equal(masked, unmasked)
    # The step weighs each sample by its own valid elements, as the per-sample mean divides.
    counts = (~batch["action_is_pad"]).sum(dim=1) * dims.sum(1)
    assert torch.equal(valid_elements({**batch, ACTION_DIM_MASK: dims}, 5), counts.double())


def test_without_the_mask_the_loss_is_unchanged(tiny_policy: SmolVLAPolicy):
    """A mask of all real dims equals no mask: one dataset stays bit-identical."""
    batch = make_batch(tiny_policy.config)
    noise, time = _noise(tiny_policy, 3)
    plain = tiny_policy.per_sample_loss(batch, noise, time)
    full = torch.ones(3, tiny_policy.config.action_dim, dtype=torch.bool)
    masked = tiny_policy.per_sample_loss({**batch, ACTION_DIM_MASK: full}, noise, time)
    torch.testing.assert_close(plain, masked, rtol=1e-6, atol=0)
    assert torch.equal(
        valid_elements(batch, 5), valid_elements({**batch, ACTION_DIM_MASK: full}, 5)
    )


def test_a_camera_a_sample_lacks_is_masked_for_that_sample(tiny_policy: SmolVLAPolicy):
    """The -1 image with its mask off (as LeRobot's empty cameras): what the lacking camera's
    pixels hold does not change that sample's loss."""
    batch = make_batch(tiny_policy.config)
    noise, time = _noise(tiny_policy, 3)
    mask = torch.tensor([True, False, True])
    batch["observation.images.wrist_padding_mask"] = mask
    first = tiny_policy.per_sample_loss(batch, noise, time)
    other = {**batch, "observation.images.wrist": batch["observation.images.wrist"].clone()}
    other["observation.images.wrist"][1] = 0.0
    second = tiny_policy.per_sample_loss(other, noise, time)
    torch.testing.assert_close(first[1], second[1], rtol=1e-5, atol=1e-6)


def test_noise_keys_of_one_dataset_are_unchanged_and_a_mixture_keys_by_dataset():
    one = flow_noise_and_time([7, 9], seed=3, step=2, chunk_size=4, action_dim=8)
    same = flow_noise_and_time([7, 9], seed=3, step=2, chunk_size=4, action_dim=8, datasets=None)
    assert torch.equal(one[0], same[0])
    mixed = flow_noise_and_time([7, 7], seed=3, step=2, chunk_size=4, action_dim=8,
                                datasets=[0, 1])  # fmt: skip
    assert not torch.equal(mixed[0][0], mixed[0][1])  # same index, two datasets
