"""LoRA adapters (`policy.peft`) in-process: a finetune of a tiny pretrained policy whose
all-reduced bytes are the adapters' gradients, whose checkpoints hold only adapter (and
full-training) tensors and resume exactly, and whose export in LeRobot's adapter layout acts
like its `--merge` export."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from smolvla_ray.build import build_policy, open_dataset
from smolvla_ray.checkpoint.discovery import fetch_checkpoint, list_checkpoints
from smolvla_ray.checkpoint.export import export_checkpoint
from smolvla_ray.policy import SmolVLAPolicy
from smolvla_ray.policy.adapters import ADAPTER_NAME, adapter_tensors, has_adapters
from smolvla_ray.policy.config import SMOLVLA_LORA_TARGETS
from smolvla_ray.run_layout import run_uri
from smolvla_ray.settings import RunSettings
from smolvla_ray.spec import spec_from_dict
from tests.inprocess import train_in_process
from tests.integration.conftest import tiny_spec_dict

pytest.importorskip("peft")

PEFT = {"r": 4, "lora_alpha": 8, "full_training_modules": ["action_out_proj"]}
TRAIN = {"steps": 8, "log_every": 2, "optimizer": {"lr": 1e-3}}


def make_base(dataset: str, where: Path) -> str:
    """A tiny 'pretrained' policy for the dataset's features, saved as LeRobot's layout."""
    spec = spec_from_dict(tiny_spec_dict(dataset, where / "unused", "base"))
    policy = build_policy(
        RunSettings.from_spec(spec),
        open_dataset(RunSettings.from_spec(spec), storage_options={}),
        storage_options={},
    )
    policy.save_pretrained(where / "base")
    return str(where / "base")


def lora_spec(dataset: str, storage: Path, name: str, base: str, **peft):
    data = tiny_spec_dict(
        dataset, storage, name, scaling={"num_workers": 1}, train=TRAIN,
        checkpoint={"storage": str(storage), "every_steps": 4},
    )  # fmt: skip
    data["policy"] = {"pretrained": base, "peft": {**PEFT, **peft}}
    return spec_from_dict(data)


def checkpoint_files(storage: Path, name: str, step: int, tmp: str) -> Path:
    infos = {i.step: i for i in list_checkpoints(run_uri(str(storage), name))}
    return fetch_checkpoint(infos[step].uri, Path(tmp))


def is_adapter_name(name: str) -> bool:
    return (
        f".lora_A.{ADAPTER_NAME}." in name
        or f".lora_B.{ADAPTER_NAME}." in name
        or (f".modules_to_save.{ADAPTER_NAME}." in name)
    )


@pytest.fixture(scope="module")
def base_dir(demo_dataset: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_base(demo_dataset, tmp_path_factory.mktemp("lora-base"))


def test_a_lora_finetune_reduces_adapter_bytes_only_checkpoints_adapters_and_resumes(
    tmp_path: Path, demo_dataset: str, base_dir: str
) -> None:
    spec = lora_spec(demo_dataset, tmp_path, "whole", base_dir)
    policy = build_policy(
        RunSettings.from_spec(spec),
        open_dataset(RunSettings.from_spec(spec), storage_options={}),
        storage_options={},
    )
    trainable = policy.trainable_parameters()
    assert trainable and all(is_adapter_name(n) for n in trainable)
    assert policy.model.vlm_is_frozen()  # the default targets: the no-grad prefix stays on
    adapter_bytes = sum(p.numel() * p.element_size() for p in trainable.values())

    state, reporter = train_in_process(spec)
    assert state is not None and state.step == 8
    assert {r["comm_bytes"] for r in reporter.reports} == {adapter_bytes}
    with tempfile.TemporaryDirectory() as tmp:
        local = checkpoint_files(tmp_path, "whole", 8, tmp)
        saved = load_file(str(local / "trainable.safetensors"))
        base_bytes = (Path(base_dir) / "model.safetensors").stat().st_size
        size = (local / "trainable.safetensors").stat().st_size
    assert set(saved) == set(trainable)
    assert size < adapter_bytes + 16_384 < base_bytes  # the adapters (float32) + a header

    # Killed after step 6 (newest checkpoint: 4), resumed: the very same adapters at step 8.
    killed = lora_spec(demo_dataset, tmp_path, "killed", base_dir)
    assert train_in_process(killed, stop_after=6)[0] is None
    state, _ = train_in_process(killed)
    assert state is not None and state.resumed_from_step == 4
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        whole = load_file(str(checkpoint_files(tmp_path, "whole", 8, a) / "trainable.safetensors"))
        again = load_file(str(checkpoint_files(tmp_path, "killed", 8, b) / "trainable.safetensors"))
    assert set(whole) == set(again)
    for name in whole:
        assert torch.equal(whole[name], again[name]), name

    # Export: LeRobot's adapter layout by default, full weights with --merge; both act alike.
    (last,) = [i for i in list_checkpoints(run_uri(str(tmp_path), "whole")) if i.step == 8]
    export_checkpoint(last.uri, str(tmp_path / "adapter"), {})
    export_checkpoint(last.uri, str(tmp_path / "merged"), {}, merge=True)
    adapter_dir, merged_dir = tmp_path / "adapter", tmp_path / "merged"
    assert not (adapter_dir / "model.safetensors").exists()
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == base_dir and config["peft_type"] == "LORA"
    assert config["target_modules"] == SMOLVLA_LORA_TARGETS and config["r"] == 4
    assert config["modules_to_save"] == ["action_out_proj"]
    assert json.loads((adapter_dir / "config.json").read_text())["use_peft"] is True
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.model.") for k in weights)
    assert len(weights) == len(trainable)
    assert json.loads((merged_dir / "config.json").read_text())["use_peft"] is False

    loaded = SmolVLAPolicy.from_pretrained(str(adapter_dir))
    merged = SmolVLAPolicy.from_pretrained(str(merged_dir))
    assert has_adapters(loaded) and not has_adapters(merged)
    for name, tensor in adapter_tensors(loaded).items():
        assert torch.equal(tensor, weights[name]), name
    base = SmolVLAPolicy.from_pretrained(base_dir)
    base_state, merged_state = base.state_dict(), merged.state_dict()
    assert set(base_state) == set(merged_state)
    changed = {k for k in base_state if not torch.equal(base_state[k], merged_state[k])}
    assert changed and all(
        k.startswith(("model.vlm_with_expert.lm_expert.", "model.state_proj", "model.action_"))
        for k in changed
    )
    batch = _batch(loaded)
    noise = torch.randn(2, loaded.config.chunk_size, loaded.config.max_action_dim)
    ours = loaded.predict_action_chunk(dict(batch), noise=noise)
    full = merged.predict_action_chunk(dict(batch), noise=noise)
    torch.testing.assert_close(ours, full, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(base.predict_action_chunk(dict(batch), noise=noise), full)


def _batch(policy: SmolVLAPolicy) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    batch = {
        key: torch.rand(2, *feature.shape, generator=g)
        for key, feature in policy.config.image_features.items()
    }
    batch["observation.state"] = torch.randn(2, policy.config.state_dim, generator=g)
    batch["observation.language.tokens"] = torch.randint(5, 300, (2, 6), generator=g)
    batch["observation.language.attention_mask"] = torch.ones(2, 6, dtype=torch.bool)
    return batch


def test_targets_that_reach_the_vlm_turn_the_no_grad_prefix_and_the_cache_off(
    demo_dataset: str, tmp_path: Path, base_dir: str
) -> None:
    from smolvla_ray.cache.build import adapter_blocker, towers_adapted_by

    spec = lora_spec(demo_dataset, tmp_path, "vlm", base_dir, target_modules=["q_proj"])
    policy = build_policy(
        RunSettings.from_spec(spec),
        open_dataset(RunSettings.from_spec(spec), storage_options={}),
        storage_options={},
    )
    names = list(policy.trainable_parameters())
    assert any(".vision_model." in n for n in names) and any(".text_model." in n for n in names)
    assert not policy.model.vlm_is_frozen()  # auto runs the joint forward
    blocker = adapter_blocker(RunSettings.from_spec(spec), policy.config)
    assert blocker is not None and "vision encoder" in blocker
    default = lora_spec(demo_dataset, tmp_path, "default", base_dir)
    assert adapter_blocker(RunSettings.from_spec(default), policy.config) is None
    settings = {"r": 2, "target_modules": r".*text_model\.layers\.0\.self_attn\.q_proj"}
    text_only = lora_spec(demo_dataset, tmp_path, "text", base_dir, **settings)
    assert (
        adapter_blocker(RunSettings.from_spec(text_only), policy.config) is None
    )  # the image tokens stay constant
    from smolvla_ray.build import lora_settings

    full = lora_settings(
        RunSettings.from_spec(
            lora_spec(demo_dataset, tmp_path, "c", base_dir, full_training_modules=["connector"])
        )
    )
    assert full is not None and towers_adapted_by(policy.config, full) == ["connector"]
