"""DDP over the trainable parameters only, and the frozen-backbone fingerprint check.

The module DDP wraps is a *view*: an `nn.ParameterList` holding the very Parameter objects
of the policy that require grad, with the full policy kept as an unregistered attribute.
DDP therefore broadcasts (at construction) and all-reduces (every step) exactly the
trainable tensors; the frozen backbone, most of the model, never touches the network
(shared/DESIGN.md invariant 2). The price: the frozen backbone must already be identical on
every worker, which `check_frozen_fingerprint` verifies before step 1.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

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
        per_sample, _ = self.policy(batch, noise=noise, time=time, reduction="none")
        return per_sample


@dataclass
class CommCounter:
    """Bytes and calls of gradient all-reduce, counted by a DDP comm hook."""

    bytes_reduced: int = 0
    num_buckets: int = 0
    history: list[int] = field(default_factory=list)

    def take(self) -> int:
        """Bytes since the last call (per optimizer step when called once per step)."""
        value = self.bytes_reduced
        self.history.append(value)
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


def frozen_fingerprint(policy: nn.Module) -> dict[str, str]:
    """sha256 of every frozen tensor's bytes, by state-dict name."""
    digests = {}
    for name, param in policy.named_parameters():
        if param.requires_grad:
            continue
        data = param.detach().to("cpu").contiguous()
        digests[name] = hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()
    return digests


def check_frozen_fingerprint(policy: nn.Module) -> str:
    """Fail clearly, before training, when workers' frozen backbones differ.

    Returns the combined fingerprint (for logs and checkpoints). Needs an initialized
    process group; with one worker it only computes the fingerprint.
    """
    digests = frozen_fingerprint(policy)
    combined = hashlib.sha256("".join(f"{k}={v};" for k, v in digests.items()).encode())
    fingerprint = combined.hexdigest()
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return fingerprint
    everyone: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, fingerprint)
    if len(set(everyone)) == 1:
        return fingerprint
    # Rare path: name the tensors and ranks that differ from rank 0.
    all_digests: list[dict[str, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(all_digests, digests)
    reference = all_digests[0] or {}
    problems = []
    for rank, theirs in enumerate(all_digests[1:], start=1):
        theirs = theirs or {}
        names = sorted(k for k in set(reference) | set(theirs) if reference.get(k) != theirs.get(k))
        if names:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            problems.append(f"rank {rank} differs from rank 0 in {len(names)} tensors: {shown}")
    raise RuntimeError(
        "frozen backbone differs across workers (DDP only syncs trainable parameters, so "
        "every worker must load the same base weights): "
        + "; ".join(problems)
        + ". Check that policy.pretrained resolves to the same checkpoint on every node."
    )
