"""Parity with LeRobot 0.6.1 without LeRobot: our outputs against LeRobot's, committed under
tests/lerobot/golden/ by tests/lerobot/make_golden.py from the very cases the live LeRobot
tests run (tests/lerobot/cases.py), with the live tests' tolerances.

Each test first rebuilds the case's inputs and checks their sha256 against the golden's, so
a changed builder (or a changed save format) fails here, not as a puzzling numeric mismatch.
"""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from smolvla_ray.policy import SmolVLAPolicy
from tests.lerobot.cases import (
    GOLDEN_DIR,
    PARITY_CASES,
    REGENERATE,
    REPO_ROOT,
    ROOT_TOKEN,
    WORKDIR_TOKEN,
    assert_evaluations_equal,
    assert_parity,
    assert_raw_inference_like_lerobot,
    evaluate_both,
    our_parity_outputs,
    parity_case,
    weights_manifest,
    write_parity_inputs,
    write_raw_inference_inputs,
)


def load_golden(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    directory = GOLDEN_DIR / name
    meta = json.loads((directory / "meta.json").read_text())
    return meta, load_file(str(directory / "outputs.safetensors"))


def _rng_path(platform_name: str, capability: str) -> tuple[str, bool]:
    # torch.randn on CPU takes a SIMD path on x86 with AVX2 (AVX512 hosts use it too) whose
    # results differ in the last bits from the scalar path other machines take.
    return platform_name, capability in ("AVX2", "AVX512")


def assert_inputs_unchanged(name: str, meta: dict, digest: str) -> None:
    if digest == meta["inputs_sha256"]:
        return
    here = f"{platform.system()} {platform.machine()}"
    capability = torch.backends.cpu.get_cpu_capability()
    if _rng_path(here, capability) != _rng_path(meta["platform"], meta["cpu_capability"]):
        pytest.skip(
            f"golden {name} was made on {meta['platform']} ({meta['cpu_capability']}); "
            f"torch's CPU random numbers differ in the last bits here ({here}, {capability})"
        )
    pytest.fail(
        f"the inputs of golden case {name!r} changed (sha256 {digest}, golden made from "
        f"{meta['inputs_sha256']}): the case builders in tests/lerobot/cases.py or what "
        f"save_pretrained writes changed. If that is intended, {REGENERATE} {name}"
    )


@pytest.mark.parametrize("name", list(PARITY_CASES))
def test_loss_gradients_actions_and_processors_equal_lerobots(tmp_path: Path, name: str) -> None:
    meta, theirs = load_golden(name)
    case = parity_case(train_expert_only=PARITY_CASES[name])
    assert_inputs_unchanged(name, meta, write_parity_inputs(case, tmp_path))
    assert_parity(our_parity_outputs(case), theirs)


@pytest.mark.parametrize("name", list(PARITY_CASES))
def test_we_load_what_lerobot_saved(tmp_path: Path, name: str) -> None:
    """LeRobot re-saved our checkpoint: the golden keeps its config.json and a manifest of
    its weights, which must be our weights under our names; then we load its directory."""
    meta, _ = load_golden(name)
    case = parity_case(train_expert_only=PARITY_CASES[name])
    assert_inputs_unchanged(name, meta, write_parity_inputs(case, tmp_path))
    assert weights_manifest(tmp_path / "pretrained_model") == meta["lerobot_saved_weights"]
    saved = tmp_path / "lerobot_saved"
    saved.mkdir()
    for file in (GOLDEN_DIR / name / "lerobot_saved").iterdir():
        if file.suffix == ".json":
            text = file.read_text().replace(ROOT_TOKEN, str(REPO_ROOT))
            (saved / file.name).write_text(text)
        else:
            shutil.copyfile(file, saved / file.name)
    shutil.copyfile(
        tmp_path / "pretrained_model" / "model.safetensors", saved / "model.safetensors"
    )
    reloaded = SmolVLAPolicy.from_pretrained(str(saved))
    for key, value in case.policy.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key


def test_raw_observation_under_dataset_keys_acts_like_lerobot(tmp_path: Path) -> None:
    meta, theirs = load_golden("raw_inference")
    assert_inputs_unchanged("raw_inference", meta, write_raw_inference_inputs(tmp_path))
    assert_raw_inference_like_lerobot(tmp_path, theirs, meta["lerobot_output_keys"])


def test_evaluate_equals_on_our_export_and_lerobots_resave(tmp_path: Path) -> None:
    """LeRobot re-saved our real-shaped export, processors and rename map included: the
    golden keeps what it wrote besides the weights (which must be ours); `evaluate` gives
    the same numbers on both directories."""
    meta, _ = load_golden("evaluate_resaved")
    assert_inputs_unchanged("evaluate_resaved", meta, write_raw_inference_inputs(tmp_path))
    assert weights_manifest(tmp_path / "pretrained_model") == meta["lerobot_saved_weights"]
    theirs = tmp_path / "lerobot_saved"
    theirs.mkdir()
    for file in (GOLDEN_DIR / "evaluate_resaved" / "lerobot_saved").iterdir():
        if file.suffix == ".json":
            text = file.read_text().replace(ROOT_TOKEN, str(REPO_ROOT))
            (theirs / file.name).write_text(text.replace(WORKDIR_TOKEN, str(tmp_path)))
        else:
            shutil.copyfile(file, theirs / file.name)
    shutil.copyfile(
        tmp_path / "pretrained_model" / "model.safetensors", theirs / "model.safetensors"
    )
    assert "rename_observations_processor" in (theirs / "policy_preprocessor.json").read_text()
    ours, resaved = evaluate_both(tmp_path, theirs)
    assert_evaluations_equal(ours, resaved)
