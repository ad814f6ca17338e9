"""LoRA adapters against LeRobot 0.6.1 without LeRobot (tests/lerobot/golden/lora, made by
tests/lerobot/make_golden.py from the live test's case, tests/lerobot/test_lora.py): an
adapter LeRobot saved loads in ours on top of the base it names and acts as it did in
LeRobot; LeRobot's actions on our adapter export equal ours on our `--merge` export."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.lerobot.cases import (
    ACTION_TOL,
    GOLDEN_DIR,
    REPO_ROOT,
    ROOT_TOKEN,
    WORKDIR_TOKEN,
    lora_actions,
    write_lora_inputs,
)
from tests.unit.policy.test_parity_golden import assert_inputs_unchanged, load_golden

pytest.importorskip("peft")


def test_an_adapter_lerobot_saved_acts_in_ours_as_in_lerobot(tmp_path: Path) -> None:
    meta, theirs = load_golden("lora")
    assert_inputs_unchanged("lora", meta, write_lora_inputs(tmp_path))
    saved = tmp_path / "lerobot_adapter"
    saved.mkdir()
    for file in (GOLDEN_DIR / "lora" / "lerobot_adapter").iterdir():
        if file.suffix == ".json":  # it names its base in the oracle's work directory
            text = file.read_text().replace(ROOT_TOKEN, str(REPO_ROOT))
            (saved / file.name).write_text(text.replace(WORKDIR_TOKEN, str(tmp_path)))
        else:
            shutil.copyfile(file, saved / file.name)
    ours = lora_actions(saved, tmp_path)
    torch.testing.assert_close(ours, theirs["lerobot_adapter.actions"], **ACTION_TOL)
    merged = lora_actions(tmp_path / "ours_merged", tmp_path)
    torch.testing.assert_close(merged, theirs["ours_adapter.actions"], **ACTION_TOL)
