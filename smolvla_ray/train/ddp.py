"""DDP over the trainable parameters only.

The module DDP wraps is a *view*: an `nn.ParameterList` holding the very Parameter objects
of the policy that require grad, with the full policy kept as an unregistered attribute.
DDP therefore broadcasts (at construction) and all-reduces (every step) exactly the
trainable tensors; the frozen backbone, most of the model, never touches the network
(docs/design.md, invariant 2). The price: the frozen backbone must already be identical on
every worker, which `smolvla_ray.policy.fingerprint.check_frozen_fingerprint` verifies
before step 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from smolvla_ray.policy.modeling import SmolVLAPolicy


class TrainableView(nn.Module):
    """Registers exactly the policy's trainable Parameters; `forward` runs the policy.

    `train()`, `eval()` and `.to()` on the view do not reach the backbone: call them on the
    policy (`view.policy`).
    """

    def __init__(self, policy: SmolVLAPolicy) -> None:
        super().__init__()
        named = policy.trainable_parameters()
        if not named:
            raise ValueError(
                "the freezing overrides leave no trainable parameter; set train_expert_only "
                "or train_state_proj so that something trains"
            )
        self.names: list[str] = list(named)
        self.params = nn.ParameterList(list(named.values()))
        object.__setattr__(self, "policy", policy)  # unregistered: DDP must not see it

    def forward(self, batch: dict, noise: Tensor, time: Tensor) -> Tensor:
        """Per-sample losses (B,), each the mean over its valid elements."""
        return self.policy.per_sample_loss(batch, noise=noise, time=time)


@dataclass
class CommCounter:
    """Bytes and calls of gradient all-reduce, counted by a DDP comm hook."""

    bytes_reduced: int = 0
    num_buckets: int = 0

    def take(self) -> int:
        """Bytes since the last call (per optimizer step when called once per step)."""
        value = self.bytes_reduced
        self.bytes_reduced = 0
        return value


def _counting_allreduce_hook(state, bucket):
    """All-reduce the bucket's gradients (averaged) and count their bytes."""
    buffer = bucket.buffer()
    state.bytes_reduced += buffer.numel() * buffer.element_size()
    state.num_buckets += 1
    world = dist.get_world_size()
    work = dist.all_reduce(buffer.div_(world), async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def wrap_ddp(
    policy: SmolVLAPolicy, *, device: torch.device
) -> tuple[DistributedDataParallel, CommCounter]:
    """DDP over the trainable view, with a hook counting reduced bytes."""
    view = TrainableView(policy)
    device_ids = [device.index] if device.type == "cuda" else None
    ddp = DistributedDataParallel(view, device_ids=device_ids, gradient_as_bucket_view=True)
    counter = CommCounter()
    ddp.register_comm_hook(counter, _counting_allreduce_hook)
    return ddp, counter


def collective_timeout_s(device: torch.device) -> float | None:
    """The default process group's collective timeout as its backend holds it (what
    `failure.collective_timeout_s` became), or None where torch does not expose it."""
    try:
        backend = dist.group.WORLD._get_backend(device)
        return backend.options._timeout.total_seconds()
    except (AttributeError, RuntimeError):
        return None
