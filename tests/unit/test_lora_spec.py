"""LoRA (`policy.peft`) input checks: the spec's defaults are LeRobot's, and what LeRobot
refuses or what would be silently ignored exits 2 before anything starts, naming the fix."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from smolvla_ray.cli import app
from smolvla_ray.policy.config import SMOLVLA_LORA_TARGETS
from smolvla_ray.spec import SpecError, spec_from_dict

runner = CliRunner()


def spec_dict(tmp_path: Path, dataset: str = "/data", **policy) -> dict:
    return {
        "name": "lora",
        "policy": {"pretrained": str(tmp_path / "base"), "peft": {}, **policy},
        "data": {"uri": dataset, "num_loader_workers": 0},
        "train": {"steps": 2, "batch_size": 2},
        "checkpoint": {"storage": str(tmp_path / "runs")},
    }


def invoke(tmp_path: Path, data: dict, command: str = "validate"):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    result = runner.invoke(app, [command, str(path)])
    return result.exit_code, " ".join(result.output.split())


def test_defaults_are_lerobots() -> None:
    peft = spec_from_dict(spec_dict(Path("/tmp"))).policy.peft
    assert peft is not None
    assert (peft.method_type, peft.r, peft.lora_alpha, peft.lora_dropout) == ("LORA", 16, 8, 0.0)
    assert peft.target_modules == SMOLVLA_LORA_TARGETS and peft.full_training_modules == []


def test_peft_without_a_pretrained_policy_is_exit_2(tmp_path: Path) -> None:
    data = spec_dict(tmp_path, preset="tiny")
    del data["policy"]["pretrained"]
    code, output = invoke(tmp_path, data)
    assert code == 2, output
    assert "peft trains adapters on a pretrained policy" in output
    assert "set policy.pretrained" in output


@pytest.mark.parametrize(
    "override", ["freeze_vision_encoder", "train_expert_only", "train_state_proj"]
)
def test_freezing_overrides_are_refused_with_peft(tmp_path: Path, override: str) -> None:
    for value in (True, False):  # even the value LeRobot's freezing would have had
        code, output = invoke(tmp_path, spec_dict(tmp_path, **{override: value}))
        assert code == 2, output
        assert f"policy.{override} would be ignored" in output


@pytest.mark.parametrize(
    ("peft", "words"),
    [
        ({"method_type": "IA3"}, "method_type"),
        ({"r": 0}, "policy.peft.r"),
        ({"target_modules": "(unclosed"}, "not a valid regex"),
        ({"target_modules": []}, "needs module names"),
        ({"rank": 8}, "valid keys at policy.peft: method_type, r, lora_alpha"),
    ],
)
def test_bad_peft_settings_are_exit_2(tmp_path: Path, peft: dict, words: str) -> None:
    code, output = invoke(tmp_path, spec_dict(tmp_path, peft=peft))
    assert code == 2 and words in output, output


def test_use_peft_in_overrides_points_to_the_peft_section() -> None:
    data = spec_dict(Path("/tmp"), overrides={"use_peft": True})
    with pytest.raises(SpecError, match="set by the policy.peft section"):
        spec_from_dict(data)


def test_run_without_the_peft_package_is_exit_2_naming_the_extra(
    tmp_path: Path, demo_dataset: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from smolvla_ray import driver

    starts: list[str] = []
    monkeypatch.setattr(driver, "start_ray", lambda *a, **k: starts.append("started"))
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` fails, find_spec is None
    code, output = invoke(tmp_path, spec_dict(tmp_path, demo_dataset), "run")
    assert code == 2, output
    assert "pip install 'smolvla-ray[peft]'" in output and "remove policy.peft" in output
    assert starts == [] and not (tmp_path / "runs").exists()


def test_run_from_an_adapter_directory_is_exit_2_naming_its_base(
    tmp_path: Path, demo_dataset: str
) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "base_model_name_or_path": "lerobot/smolvla_base"})
    )
    data = spec_dict(tmp_path, demo_dataset, pretrained=str(adapter))
    del data["policy"]["peft"]
    code, output = invoke(tmp_path, data, "run")
    assert code == 2, output
    assert "is a PEFT adapter (adapter_config.json) on top of 'lerobot/smolvla_base'" in output
    assert "Set policy.pretrained: lerobot/smolvla_base" in output
