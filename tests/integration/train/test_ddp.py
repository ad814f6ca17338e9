"""Trainable-only DDP and the frozen-backbone check, on real Ray Train workers (gloo)."""

from __future__ import annotations

import pytest
import ray.train
import torch
import torch.distributed as dist
from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer

from smolvla_ray.policy import PolicyConfig, SmolVLAPolicy
from smolvla_ray.policy.fingerprint import check_frozen_fingerprint
from smolvla_ray.train.ddp import wrap_ddp

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]


def tiny_policy(seed: int) -> SmolVLAPolicy:
    config = PolicyConfig.preset("tiny").with_features(
        state_dim=6, action_dim=6, cameras={"top": (3, 64, 64)}
    )
    torch.manual_seed(seed)
    return SmolVLAPolicy(config)


def gathered(value: float) -> list[float]:
    out: list[float | None] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out  # type: ignore[return-value]


def construction_broadcast_loop(_: dict) -> None:
    """Each rank starts with its own random weights: DDP's construction broadcast must make
    the trainable ones equal (rank 0's) and leave every frozen one alone."""
    rank = ray.train.get_context().get_world_rank()
    policy = tiny_policy(seed=rank)
    frozen = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    before = {n: gathered(float(p.detach().double().sum())) for n, p in policy.named_parameters()}
    ddp, _ = wrap_ddp(policy, device=torch.device("cpu"))
    registered = {id(p) for p in ddp.module.parameters()}
    expected = {id(p) for p in policy.parameters() if p.requires_grad}
    if registered != expected:
        raise AssertionError("DDP registered parameters other than the trainable ones")
    for name, param in policy.named_parameters():
        sums = gathered(float(param.detach().double().sum()))
        if param.requires_grad and len(set(sums)) != 1:
            raise AssertionError(f"trainable {name} was not broadcast: {sums}")
        if not param.requires_grad:
            if not torch.equal(param, frozen[name]):
                raise AssertionError(f"frozen {name} changed at DDP construction")
            if len(set(before[name])) > 1 and len(set(sums)) == 1:
                raise AssertionError(f"frozen {name} equal across ranks: it was broadcast")
    differing = [n for n in frozen if len(set(before[n])) > 1]
    if len(differing) < len(frozen) // 2:  # the check above must have had something to see
        raise AssertionError(f"only {len(differing)} of {len(frozen)} frozen tensors differed")
    ray.train.report({"ok": 1})


def mismatched_frozen_loop(_: dict) -> None:
    rank = ray.train.get_context().get_world_rank()
    check_frozen_fingerprint(tiny_policy(seed=rank))  # a different base on each rank
    ray.train.report({"ok": 1})


def run(loop) -> None:
    TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=2)).fit()


def test_construction_broadcasts_only_trainable_tensors() -> None:
    run(construction_broadcast_loop)


def test_different_frozen_backbones_fail_naming_the_tensors() -> None:
    with pytest.raises(
        Exception,
        match=r"frozen backbone differs across workers.*rank 1 differs "
        r"from rank 0 in \d+ tensors: model\.vlm_with_expert\.vlm",
    ):
        run(mismatched_frozen_loop)
