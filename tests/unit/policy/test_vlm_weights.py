"""`load_vlm_weights`: the VLM starts from saved SmolVLM weights, read in bfloat16 as LeRobot
0.6.1 reads them, held in float32; checkpoints and exports record the source and rebuild it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from transformers import AutoConfig, SmolVLMForConditionalGeneration

from smolvla_ray.checkpoint.export import policy_from_checkpoint
from smolvla_ray.checkpoint.format import TrainingState, write_checkpoint
from smolvla_ray.checkpoint.writer import CheckpointWriter
from smolvla_ray.policy import SmolVLAPolicy
from smolvla_ray.policy.config import TINY_VLM_DIR
from smolvla_ray.policy.fingerprint import check_frozen_fingerprint
from smolvla_ray.policy.processor import PolicyProcessor
from smolvla_ray.settings import RunSettings
from smolvla_ray.spec import PolicySpec, spec_from_dict
from tests.unit.policy.conftest import tiny_config

VLM = "model.vlm_with_expert.vlm."
EXPERT = "model.vlm_with_expert.lm_expert."


def save_tiny_vlm(directory: Path, *, seed: int) -> dict[str, torch.Tensor]:
    """The tiny SmolVLM with seeded random weights, saved as transformers saves a VLM (config
    + safetensors) next to the packaged tokenizer files; returns its float32 state dict."""
    torch.manual_seed(seed)
    vlm = SmolVLMForConditionalGeneration(AutoConfig.from_pretrained(TINY_VLM_DIR))
    vlm.save_pretrained(directory)
    for path in TINY_VLM_DIR.iterdir():
        if path.name != "config.json":
            shutil.copy(path, directory / path.name)
    return {k: v.detach().clone() for k, v in vlm.state_dict().items()}


@pytest.fixture
def saved_vlm(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    directory = tmp_path / "vlm-with-weights"
    return directory, save_tiny_vlm(directory, seed=123)


def vlm_tensors(policy: SmolVLAPolicy) -> dict[str, torch.Tensor]:
    return {k.removeprefix(VLM): v for k, v in policy.state_dict().items() if k.startswith(VLM)}


def build(directory: Path | str, *, load: bool = True, seed: int = 0) -> SmolVLAPolicy:
    torch.manual_seed(seed)
    return SmolVLAPolicy(tiny_config(vlm_model_name=str(directory), load_vlm_weights=load))


def test_vlm_starts_from_the_saved_weights_rounded_to_bfloat16(saved_vlm) -> None:
    directory, saved = saved_vlm
    loaded = vlm_tensors(build(directory))
    # The text model is truncated to num_vlm_layers=4 of 6, as LeRobot truncates it.
    kept = {
        k
        for k in saved
        if not k.startswith(("model.text_model.layers.4.", "model.text_model.layers.5."))
    }
    assert set(loaded) == kept
    for name, tensor in loaded.items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, saved[name].to(torch.bfloat16).to(torch.float32)), name
    # The round trip is real: float32 weights lose bits in bfloat16, as in LeRobot.
    assert not all(torch.equal(loaded[k], saved[k]) for k in loaded)


def test_expert_is_born_as_lerobots_bfloat16_expert_then_held_in_float32(saved_vlm) -> None:
    directory, _ = saved_vlm
    policy = build(directory)
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    towers = policy.model.vlm_with_expert
    expert = {
        k.removeprefix(EXPERT): v for k, v in policy.state_dict().items() if k.startswith(EXPERT)
    }
    # LeRobot's from_config follows the loaded text config's bfloat16 dtype, all but the
    # cross-attention k/v projections it builds afterwards with nn.Linear (float32).
    cross = {
        f"layers.{i}.self_attn.{proj}.{kind}"
        for i in range(towers.num_expert_layers)
        if not towers.is_self_attn_layer(i)
        for proj in ("k_proj", "v_proj")
        for kind in ("weight", "bias")
    }
    born_bf16 = [k for k in expert if k not in cross and expert[k].abs().sum() > 0]
    assert born_bf16
    for name in born_bf16:
        value = expert[name]
        assert torch.equal(value, value.to(torch.bfloat16).to(torch.float32)), name
    cross_weights = [expert[k] for k in cross if k in expert]
    assert cross_weights
    assert any(not torch.equal(w, w.to(torch.bfloat16).to(torch.float32)) for w in cross_weights)


def test_without_load_vlm_weights_the_vlm_is_random(saved_vlm) -> None:
    directory, saved = saved_vlm
    loaded = vlm_tensors(build(directory, load=True))
    random = vlm_tensors(build(directory, load=False))
    name = "model.text_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(random[name], loaded[name])
    assert not torch.equal(random[name], saved[name])
    # Same seed, same source: the very same base again (the fingerprint export relies on).
    assert check_frozen_fingerprint(build(directory)) == check_frozen_fingerprint(build(directory))


def test_a_hub_id_is_read_from_the_hugging_face_cache(
    saved_vlm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory, _ = saved_vlm
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--someone--tiny-vlm"
    shutil.copytree(directory, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    from_hub = vlm_tensors(build("someone/tiny-vlm"))
    from_dir = vlm_tensors(build(directory))
    assert from_hub.keys() == from_dir.keys()
    assert all(torch.equal(from_hub[k], from_dir[k]) for k in from_hub)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("/nonexistent/vlm-dir", "neither a local directory nor a hub id"),
        ("someone/not-cached-vlm", "could not fetch the VLM weights from the hub"),
        (str(TINY_VLM_DIR), "holds no *.safetensors weights"),
    ],
)
def test_a_missing_source_is_a_clear_error(
    source: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="load_vlm_weights=true") as info:
        build(source)
    assert message in str(info.value)
    assert repr(source) in str(info.value)


def test_incomplete_weights_are_an_error(saved_vlm) -> None:
    directory, saved = saved_vlm
    from safetensors.torch import save_file

    del saved["model.text_model.layers.0.mlp.up_proj.weight"]
    save_file(saved, str(directory / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="mlp.up_proj.weight"):
        build(directory)


def test_pretrained_model_loads_without_fetching_the_vlm(saved_vlm, tmp_path: Path) -> None:
    directory, _ = saved_vlm
    policy = build(directory)
    target = tmp_path / "pretrained_model"
    policy.save_pretrained(target)
    exported = json.loads((target / "config.json").read_text())
    assert exported["load_vlm_weights"] is True
    assert exported["vlm_model_name"] == str(directory)
    # The VLM's weights are now only in the pretrained_model/: loading must not look for them.
    for path in directory.glob("*.safetensors"):
        path.unlink()
    loaded = SmolVLAPolicy.from_pretrained(str(target))
    assert loaded.config.load_vlm_weights is True
    reference = policy.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in loaded.state_dict().items())


def write_run_checkpoint(directory: Path, policy: SmolVLAPolicy, vlm: Path, seed: int) -> dict:
    """A checkpoint as a `preset: tiny` run with load_vlm_weights writes it (no training)."""
    spec = spec_from_dict(
        {
            "name": "job",
            "policy": {
                "preset": "tiny",
                "overrides": {"vlm_model_name": str(vlm), "load_vlm_weights": True},
            },
            "data": {"uri": "./dataset"},
            "train": {"steps": 1, "batch_size": 2, "seed": seed},
            "checkpoint": {"storage": "./runs"},
        }
    )
    writer = CheckpointWriter(
        settings=RunSettings.from_spec(spec),
        policy=policy,
        base_fingerprint=check_frozen_fingerprint(policy),
    )
    stats = {
        "observation.state": {"mean": torch.zeros(6), "std": torch.ones(6)},
        "action": {"mean": torch.zeros(5), "std": torch.ones(5)},
    }
    directory.mkdir()
    PolicyProcessor(policy.config, stats).save(directory)
    trainable = policy.trainable_parameters()
    state = TrainingState(
        step=1,
        epoch=0,
        cursors=[],
        param_names=list(trainable),
        param_groups=[],
        scheduler={},
        spec=writer.spec_json,
        policy_config=json.loads(policy.config.to_lerobot_json()),
        base=writer.base,
    )
    write_checkpoint(
        directory,
        trainable={k: v.detach() + 0.5 for k, v in trainable.items()},  # "trained"
        optimizer={},
        rng_states=[torch.get_rng_state()],
        state=state,
    )
    return writer.base


def test_checkpoint_records_the_source_and_export_rebuilds_that_base(
    saved_vlm, tmp_path: Path
) -> None:
    directory, saved = saved_vlm
    seed = 7
    policy = build(directory, seed=seed)
    checkpoint = tmp_path / "checkpoint_000001"
    base = write_run_checkpoint(checkpoint, policy, directory, seed)
    assert base["uri"] == "preset:tiny"
    assert base["vlm_weights"] == str(directory)

    exported = policy_from_checkpoint(str(checkpoint))
    assert exported.config.load_vlm_weights is True
    assert torch.equal(
        vlm_tensors(exported)["model.text_model.layers.0.self_attn.q_proj.weight"],
        saved["model.text_model.layers.0.self_attn.q_proj.weight"].to(torch.bfloat16).float(),
    )
    name = next(iter(policy.trainable_parameters()))
    assert torch.equal(exported.state_dict()[name], policy.state_dict()[name] + 0.5)

    # Other weights at the recorded source: export refuses to merge into that base.
    save_tiny_vlm(directory, seed=124)
    with pytest.raises(ValueError, match=rf"VLM weights from {directory}"):
        policy_from_checkpoint(str(checkpoint))


def test_random_init_base_records_no_vlm_weights(tmp_path: Path) -> None:
    policy = build(TINY_VLM_DIR, load=False)
    spec = spec_from_dict(
        {
            "name": "job",
            "policy": {"preset": "tiny"},
            "data": {"uri": "./dataset"},
            "train": {"steps": 1, "batch_size": 2},
            "checkpoint": {"storage": "./runs"},
        }
    )
    settings = RunSettings.from_spec(spec)
    writer = CheckpointWriter(settings=settings, policy=policy, base_fingerprint="x")
    assert writer.base["vlm_weights"] is None


def test_spec_takes_load_vlm_weights_with_a_preset_only() -> None:
    PolicySpec(preset="base", overrides={"load_vlm_weights": True})
    PolicySpec(pretrained="lerobot/smolvla_base", overrides={"load_vlm_weights": False})
    with pytest.raises(ValueError, match="the checkpoint holds the VLM weights"):
        PolicySpec(pretrained="lerobot/smolvla_base", overrides={"load_vlm_weights": True})
