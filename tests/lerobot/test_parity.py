"""Parity with LeRobot 0.6.1 itself: the same checkpoint gives the same loss, gradients and
actions in both, and each side loads what the other saves.

Runs only where `LEROBOT_PYTHON` names an interpreter with `lerobot[smolvla]==0.6.1`
(a development-time oracle; CI does not have it, and checks the committed goldens instead:
tests/unit/policy/test_parity_golden.py). The cases are defined once, in `cases.py`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from smolvla_ray.policy import SmolVLAPolicy
from tests.lerobot.cases import (
    PARITY_CASES,
    assert_parity,
    our_parity_outputs,
    parity_case,
    run_oracle,
    write_parity_inputs,
)

LEROBOT_PYTHON = os.environ.get("LEROBOT_PYTHON")
pytestmark = [
    pytest.mark.lerobot,
    pytest.mark.skipif(not LEROBOT_PYTHON, reason="set LEROBOT_PYTHON to a LeRobot 0.6.1 python"),
]


@pytest.mark.parametrize("name", list(PARITY_CASES))
def test_lerobot_matches(tmp_path: Path, name: str) -> None:
    case = parity_case(train_expert_only=PARITY_CASES[name])
    write_parity_inputs(case, tmp_path)
    theirs = run_oracle(LEROBOT_PYTHON, "oracle.py", tmp_path)
    assert_parity(our_parity_outputs(case), theirs)

    # Reverse: what LeRobot saves, we load, with identical weights.
    reloaded = SmolVLAPolicy.from_pretrained(str(tmp_path / "lerobot_saved"))
    for key, value in case.policy.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
