"""The one tensor-hashing rule and the fingerprints built on it."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from smolvla_ray.cache.store import VISION_PREFIXES
from smolvla_ray.policy import SmolVLAPolicy
from smolvla_ray.policy.fingerprint import (
    check_frozen_fingerprint,
    combine_digests,
    frozen_fingerprint,
    frozen_sha256,
    safetensors_digests,
    tensor_digest,
    tensors_digest,
)
from smolvla_ray.policy.freezing import trainable_image_towers
from tests.unit.policy.conftest import tiny_config


def test_float32_hashes_its_bytes_and_narrower_floats_their_float32_upcast() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g)
    # float32: the raw bytes, as fingerprints recorded in older checkpoints were computed.
    assert tensor_digest(x) == hashlib.sha256(x.numpy().tobytes()).hexdigest()
    rounded = x.bfloat16()
    assert tensor_digest(rounded) == tensor_digest(rounded.float())
    assert tensor_digest(x.half()) == tensor_digest(x.half().float())
    assert tensor_digest(rounded) != tensor_digest(x)  # rounding is a change
    assert tensor_digest(x.t()) == tensor_digest(x.t().contiguous())  # values, not strides
    ints = torch.arange(6, dtype=torch.int64)
    assert tensor_digest(ints) == hashlib.sha256(ints.numpy().tobytes()).hexdigest()
    assert tensor_digest(torch.tensor(1.5)) == tensor_digest(torch.tensor([1.5]))  # 0-dim
    assert tensors_digest([rounded, ints]) == tensors_digest([rounded.float(), ints])
    assert tensors_digest([x, ints]) != tensors_digest([ints, x])


def test_frozen_fingerprint_covers_frozen_parameters_only() -> None:
    torch.manual_seed(0)
    policy = SmolVLAPolicy(tiny_config())
    digests = frozen_fingerprint(policy)
    frozen = [n for n, p in policy.named_parameters() if not p.requires_grad]
    assert list(digests) == frozen  # registration order: the combined value depends on it
    assert frozen_sha256(policy) == combine_digests(digests)
    assert check_frozen_fingerprint(policy) == frozen_sha256(policy)  # no process group
    policy.model.vlm_with_expert.vlm.to(torch.bfloat16)  # frozen_dtype=bf16 rounds: a change
    assert frozen_sha256(policy) != combine_digests(digests)


def test_safetensors_digests_equal_the_loaded_tensors_digests(tmp_path: Path) -> None:
    torch.manual_seed(0)
    policy = SmolVLAPolicy(tiny_config())
    state = {k: v.detach().bfloat16() for k, v in policy.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    found = safetensors_digests(tmp_path / "w.safetensors", lambda n: n.startswith("model.state"))
    assert found == {k: tensor_digest(v.float()) for k, v in sorted(state.items())
                     if k.startswith("model.state")}  # fmt: skip


def test_vision_prefixes_name_exactly_the_vision_encoder_and_connector() -> None:
    policy = SmolVLAPolicy(tiny_config())
    towers = policy.model.vlm_with_expert
    expected = {id(p) for m in (towers.vision_model, towers.vlm.model.connector)
                for p in m.parameters()}  # fmt: skip
    selected = {id(p) for n, p in policy.named_parameters() if n.startswith(VISION_PREFIXES)}
    assert selected == expected and expected


@pytest.mark.parametrize(("fve", "teo"), list(itertools.product([True, False], repeat=2)))
def test_trainable_image_towers_follows_apply_requires_grad(fve: bool, teo: bool) -> None:
    policy = SmolVLAPolicy(tiny_config(freeze_vision_encoder=fve, train_expert_only=teo))
    towers = policy.model.vlm_with_expert
    image_towers = {"vision encoder": towers.vision_model, "connector": towers.vlm.model.connector}
    actual = [n for n, m in image_towers.items() if any(p.requires_grad for p in m.parameters())]
    assert trainable_image_towers(freeze_vision_encoder=fve, train_expert_only=teo) == actual
