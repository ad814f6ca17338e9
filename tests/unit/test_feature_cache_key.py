"""The feature-cache key, computed on the driver without building the model: a pretrained
checkpoint is keyed by its vision encoder and connector tensors as stored (a bf16 file as its
float32 load), a preset by what seeds it; the freezing overrides decide whether it applies."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from smolvla_ray.build import resolve_dataset_features
from smolvla_ray.cache.build import ensure_feature_cache, vision_blocker
from smolvla_ray.cache.store import (
    VISION_PREFIXES,
    cache_key,
    key_inputs,
    pretrained_weights_file,
    vision_identity,
)
from smolvla_ray.data.meta import load_meta
from smolvla_ray.policy import PolicyConfig, SmolVLAPolicy
from smolvla_ray.policy.fingerprint import combine_digests, tensor_digest
from smolvla_ray.policy.pretrained import WEIGHTS_NAME
from smolvla_ray.settings import RunSettings
from smolvla_ray.spec import JobSpec, spec_from_dict
from tests.realshape import RENAME_MAP, write_base_shaped_checkpoint, write_libero_shaped_dataset

VISION = "model.vlm_with_expert.vlm.model.vision_model.encoder.layers.0.mlp.fc1.weight"
EXPERT = "model.vlm_with_expert.lm_expert.layers.0.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("key")
    return {
        "base": write_base_shaped_checkpoint(root / "base"),
        "dataset": write_libero_shaped_dataset(root / "libero", episodes=1, length=4),
    }


def _refuse(*args, **kwargs):
    raise AssertionError("the feature-cache key must not build the policy")


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SmolVLAPolicy, "__init__", _refuse)


def spec_for(real: dict[str, str], storage: Path, *, seed: int = 1000, **policy) -> JobSpec:
    data = {"uri": real["dataset"], "feature_cache": "auto"}
    if "pretrained" in policy:
        data["rename_map"] = RENAME_MAP  # the checkpoint's cameras are camera1..3
    return spec_from_dict(
        {
            "name": "key",
            "policy": policy,
            "data": data,
            "train": {"steps": 1, "batch_size": 1, "seed": seed},
            "checkpoint": {"storage": str(storage)},
        }
    )


def key_of(spec: JobSpec) -> str:
    settings = RunSettings.from_spec(spec)
    meta = load_meta(spec.data.uri)
    config, resolution = resolve_dataset_features(settings, meta, storage_options={})
    return cache_key(key_inputs(settings, config, resolution, meta, storage_options={}))


def variant(base: str, target: Path, change) -> str:
    """A copy of the checkpoint `base` whose tensors went through `change(state)`."""
    shutil.copytree(base, target)
    state = load_file(str(target / WEIGHTS_NAME))
    save_file(change(state), str(target / WEIGHTS_NAME), metadata={"format": "pt"})
    return str(target)


def bumped(name: str):
    def change(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        state[name] = state[name].clone()
        state[name].view(-1)[0] += 1.0
        return state

    return change


def test_pretrained_key_follows_vision_tensors_only(
    real: dict[str, str], tmp_path: Path, no_model: None
) -> None:
    assert VISION.startswith(VISION_PREFIXES) and not EXPERT.startswith(VISION_PREFIXES)
    base = key_of(spec_for(real, tmp_path, pretrained=real["base"]))
    assert key_of(spec_for(real, tmp_path, pretrained=real["base"])) == base
    vision = variant(real["base"], tmp_path / "vision", bumped(VISION))
    expert = variant(real["base"], tmp_path / "expert", bumped(EXPERT))
    assert key_of(spec_for(real, tmp_path, pretrained=vision)) != base
    assert key_of(spec_for(real, tmp_path, pretrained=expert)) == base
    # Another location of the same weights (an fsspec URL: only model.safetensors is fetched).
    assert key_of(spec_for(real, tmp_path, pretrained=f"file://{real['base']}")) == base


def test_bf16_stored_checkpoint_keys_as_its_float32_copy(
    real: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def rounded(state):  # bf16-representable values, still float32
        return {k: v.bfloat16().float() for k, v in state.items()}

    f32 = variant(real["base"], tmp_path / "f32", rounded)
    bf16 = variant(
        real["base"], tmp_path / "bf16", lambda s: {k: v.bfloat16() for k, v in s.items()}
    )
    assert load_file(f"{bf16}/{WEIGHTS_NAME}")[VISION].dtype == torch.bfloat16

    spec = spec_for(real, tmp_path, pretrained=bf16)
    with monkeypatch.context() as patch:
        patch.setattr(SmolVLAPolicy, "__init__", _refuse)
        keyed = key_of(spec)
        assert keyed == key_of(spec_for(real, tmp_path, pretrained=f32))
        assert keyed != key_of(spec_for(real, tmp_path, pretrained=real["base"]))
        identity = vision_identity(RunSettings.from_spec(spec), PolicyConfig(), storage_options={})
    # ... and the identity is the digest of the very tensors the workers load (float32).
    policy = SmolVLAPolicy.from_pretrained(bf16)
    loaded = {n: tensor_digest(p) for n, p in policy.state_dict().items()
              if n.startswith(VISION_PREFIXES)}  # fmt: skip
    assert identity == {"pretrained_weights": combine_digests(dict(sorted(loaded.items())))}


def test_preset_key_follows_the_seed_without_a_model(
    real: dict[str, str], tmp_path: Path, no_model: None
) -> None:
    first = key_of(spec_for(real, tmp_path, preset="tiny", seed=1))
    assert key_of(spec_for(real, tmp_path, preset="tiny", seed=1)) == first
    assert key_of(spec_for(real, tmp_path, preset="tiny", seed=2)) != first
    spec = spec_for(real, tmp_path, preset="tiny", seed=1)
    settings = RunSettings.from_spec(spec)
    identity = vision_identity(settings, PolicyConfig.preset("tiny"), storage_options={})
    assert identity["preset"] == "tiny" and identity["seed"] == 1
    assert "_name_or_path" not in identity["vlm_config"]  # no machine-local path in the key


def test_hub_id_reads_only_the_weights_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from smolvla_ray import hub

    asked = []
    monkeypatch.setattr(
        hub, "model_file", lambda repo, name, revision=None: asked.append((repo, name, revision))
    )
    pretrained_weights_file("me/policy", tmp_path, revision="v1", storage_options={})
    assert asked == [("me/policy", WEIGHTS_NAME, "v1")]


def test_the_resolved_overrides_decide_whether_the_cache_applies(
    real: dict[str, str], tmp_path: Path, no_model: None, capfd
) -> None:
    # The checkpoint's config.json trains the connector (train_expert_only: false): cached
    # image tokens would be stale, and the spec alone cannot tell.
    config = PolicyConfig.from_lerobot_json(Path(real["base"], "config.json").read_text())
    partial = tmp_path / "partial"
    shutil.copytree(real["base"], partial)
    (partial / "config.json").write_text(
        config.model_copy(update={"train_expert_only": False}).to_lerobot_json()
    )
    spec = spec_for(real, tmp_path, pretrained=str(partial))
    assert ensure_feature_cache(spec, {}) is None
    assert "the policy's connector trains" in capfd.readouterr().err
    assert vision_blocker(PolicyConfig(freeze_vision_encoder=False, train_expert_only=False))
    assert vision_blocker(PolicyConfig(freeze_vision_encoder=False, train_expert_only=True)) is None


def test_the_key_follows_the_precision_features_are_encoded_in(
    real: dict[str, str], tmp_path: Path, no_model: None
) -> None:
    fp32 = spec_for(real, tmp_path, preset="tiny")
    data = {"uri": real["dataset"], "feature_cache": "auto"}
    gpu = {"use_gpu": True}
    bf16 = spec_from_dict({**fp32.public_dict(), "data": data, "scaling": gpu})
    assert bf16.resolved_precision() == "bf16" and fp32.resolved_precision() == "fp32"
    meta = load_meta(real["dataset"])
    fp32_run, bf16_run = RunSettings.from_spec(fp32), RunSettings.from_spec(bf16)
    config, resolution = resolve_dataset_features(fp32_run, meta, storage_options={})
    inputs = key_inputs(bf16_run, config, resolution, meta, storage_options={})
    assert inputs["encode_precision"] == "bf16" and inputs["format"] == 3
    assert key_of(bf16) != key_of(fp32)
    gpu_fp32 = {**bf16.public_dict(), "train": {**bf16.public_dict()["train"], "precision": "fp32"}}
    assert key_of(spec_from_dict(gpu_fp32)) == key_of(fp32)  # the device alone is not keyed
