"""LoRA adapters between LeRobot 0.6.1 and ours: LeRobot loads our adapter export (through
`make_policy`'s `use_peft` path) and acts as our `--merge` export does; an adapter LeRobot
trained and saved loads in ours and acts as it does in LeRobot.

Runs only where `LEROBOT_PYTHON` names an interpreter with `lerobot[smolvla,peft]==0.6.1`;
CI checks the LeRobot-saved adapter against the committed golden instead
(tests/unit/policy/test_lora_golden.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.lerobot.cases import ACTION_TOL, lora_actions, run_oracle, write_lora_inputs

LEROBOT_PYTHON = os.environ.get("LEROBOT_PYTHON")
pytestmark = [
    pytest.mark.lerobot,
    pytest.mark.skipif(not LEROBOT_PYTHON, reason="set LEROBOT_PYTHON to a LeRobot 0.6.1 python"),
]
pytest.importorskip("peft")


def test_lora_adapters_cross_between_lerobot_and_ours(tmp_path: Path) -> None:
    write_lora_inputs(tmp_path)
    theirs = run_oracle(LEROBOT_PYTHON, "oracle_lora.py", tmp_path)
    # LeRobot on our adapter export = ours on our merged export (= ours on the adapter).
    merged = lora_actions(tmp_path / "ours_merged", tmp_path)
    adapter = lora_actions(tmp_path / "ours_adapter", tmp_path)
    torch.testing.assert_close(theirs["ours_adapter.actions"], merged, **ACTION_TOL)
    torch.testing.assert_close(theirs["ours_adapter.actions"], adapter, **ACTION_TOL)
    # An adapter LeRobot saved, loaded by ours on top of the base it names.
    ours = lora_actions(tmp_path / "lerobot_adapter", tmp_path)
    torch.testing.assert_close(ours, theirs["lerobot_adapter.actions"], **ACTION_TOL)
    base = lora_actions(tmp_path / "base", tmp_path)  # the adapters do change the actions
    assert not torch.allclose(base, ours, **ACTION_TOL)
    assert not torch.allclose(base, merged, **ACTION_TOL)
