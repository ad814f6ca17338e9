"""Fingerprints of weights: the one rule for hashing a tensor, and what is built on it.

The rule (`tensor_digest`): sha256 of the tensor's values as bytes, floating tensors of up to
32 bits read as float32, any other dtype as its own bytes. So a float32 tensor hashes its
raw bytes (the fingerprints recorded in older checkpoints stay valid), and a bf16 or fp16
tensor hashes like its exact float32 upcast: a `model.safetensors` stored in bf16 hashes the
same as the float32 policy loaded from it, and the frozen backbone held in bf16 compares
with itself across workers. Shape and name are not part of a tensor's digest; the
fingerprints key digests by name.

- `frozen_fingerprint` / `frozen_sha256`: every frozen parameter of a policy, by
  state-dict name / combined; what checkpoints record as `base.frozen_sha256` and what export
  verifies its rebuilt base against.
- `check_frozen_fingerprint`: the same, compared across DDP workers before step 1 (DDP syncs
  only the trainable parameters, so every worker must start from the same frozen backbone).
- `tensors_digest`: one digest of a sequence of tensors (e.g. the trainable parameters of
  each replica, compared across workers).
- `safetensors_digests`: digests of the named tensors of a safetensors file, read one at a
  time with `safe_open` (no model is built).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn


def _tensor_bytes(tensor: Tensor) -> bytes:
    data = tensor.detach().to("cpu")
    if data.is_floating_point() and data.element_size() <= 4:
        data = data.to(torch.float32)
    return data.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def tensor_digest(tensor: Tensor) -> str:
    """sha256 (hex) of one tensor under the rule above."""
    return hashlib.sha256(_tensor_bytes(tensor)).hexdigest()


def tensors_digest(tensors: Iterable[Tensor]) -> str:
    """One sha256 (hex) over the tensors' bytes in order, each read as `tensor_digest` does."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def combine_digests(digests: Mapping[str, str]) -> str:
    """One sha256 (hex) of named digests, in the mapping's order (sort it for an
    order-free value)."""
    return hashlib.sha256("".join(f"{k}={v};" for k, v in digests.items()).encode()).hexdigest()


def frozen_fingerprint(policy: nn.Module) -> dict[str, str]:
    """The digest of every frozen parameter, by state-dict name, in registration order."""
    return {
        name: tensor_digest(param)
        for name, param in policy.named_parameters()
        if not param.requires_grad
    }


def frozen_sha256(policy: nn.Module) -> str:
    """The combined frozen fingerprint (checkpoints record it as `base.frozen_sha256`)."""
    return combine_digests(frozen_fingerprint(policy))


def safetensors_digests(path: str | Path, select: Callable[[str], bool]) -> dict[str, str]:
    """The digest of every tensor of the safetensors file at `path` whose name `select`
    accepts, by name, sorted by name; tensors are read one at a time (no model is built)."""
    from safetensors import safe_open

    digests = {}
    with safe_open(str(path), framework="pt") as weights:
        for name in sorted(weights.keys()):
            if select(name):
                digests[name] = tensor_digest(weights.get_tensor(name))
    return digests


def check_frozen_fingerprint(policy: nn.Module) -> str:
    """Fail clearly, before training, when workers' frozen backbones differ.

    Returns the combined fingerprint (`frozen_sha256`, for logs and checkpoints). Needs an
    initialized process group; with none, or one worker, it only computes the fingerprint.
    """
    digests = frozen_fingerprint(policy)
    fingerprint = combine_digests(digests)
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
